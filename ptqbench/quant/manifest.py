"""Coverage manifest: every quantized op with its bits/granularity/regime, and what stays FP."""
from __future__ import annotations

from typing import Optional

from torch import nn

from .attention import QuantAttnProcessor
from .lsq import ActQuantizer
from .modules import QuantLayer
from .weight import WeightQuantizer

#: ops that are not modules and are never quantized by this core (listed for completeness)
FUNCTIONAL_FP_OPS = [
    "residual additions and output rescaling",
    "skip-connection concatenations",
    "nearest-neighbour upsampling / interpolation",
    "timestep sinusoidal projection",
    "softmax itself (its output is quantized when attention matmuls are)",
]


def _act_entry(q: ActQuantizer, recipe) -> dict:
    return {"bits": q.bits, "mode": q.mode, "granularity": "tensor",
            "params": "per_step" if q.num_steps > 1 else "shared", "num_steps": q.num_steps}


def build_manifest(qmodel: nn.Module, recipe, fp_layers: dict,
                   roles: Optional[dict] = None) -> dict:
    """``roles``: layer name -> role (time_embedding, adaln, text_encoder; see quant.roles)."""
    roles = roles or {}
    layers, matmuls, fp_modules = [], [], []
    inside_quant: set[str] = set()
    for name, m in qmodel.named_modules():
        if isinstance(m, (QuantLayer, QuantAttnProcessor)):
            inside_quant.update(n for n, _ in m.named_modules(prefix=name))
    n_wq = n_wfp = 0
    for name, m in qmodel.named_modules():
        if isinstance(m, QuantLayer):
            entry = {"name": name, "type": m.kind, "in": m.in_features, "out": m.out_features,
                     "split": m.split or None}
            if name in roles:
                entry["role"] = roles[name]
            wqs = m.weight_quantizers
            if wqs is None:
                entry["weight"] = "fp"
                n_wfp += m.weight.numel()
            else:
                wq: WeightQuantizer = wqs[0]
                entry["weight"] = {"bits": wq.bits, "mode": wq.mode,
                                   "granularity": "channel" if wq.per_channel else "tensor",
                                   "form": wq.form}
                n_wq += sum(int(torch_numel(q.weight_shape)) for q in wqs)
            entry["input"] = ("fp" if m.act_quantizers is None
                              else _act_entry(m.act_quantizers[0], recipe))
            layers.append(entry)
        elif isinstance(m, QuantAttnProcessor):
            owner = name.rsplit(".processor", 1)[0]
            for op, (a, b) in {"q@k^T": ("q", "k"), "softmax@v": ("softmax", "v")}.items():
                qs = m.quantizers()
                matmuls.append({"name": f"{owner}:{op}",
                                "inputs": {a: _act_entry(qs[a], recipe),
                                           b: _act_entry(qs[b], recipe)}})
        elif name and name not in inside_quant and not any(True for _ in m.children()):
            reason = fp_layers.get(name, "not a quantized op type")
            fp_modules.append({"name": name, "type": type(m).__name__, "reason": reason})
            if name in roles:
                fp_modules[-1]["role"] = roles[name]
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                n_wfp += m.weight.numel()
    attn_fp = []
    try:
        from diffusers.models.attention_processor import Attention
        attn_fp = [n for n, m in qmodel.named_modules()
                   if isinstance(m, Attention) and not isinstance(m.processor, QuantAttnProcessor)]
    except Exception:  # pragma: no cover
        pass
    fp_ops = list(FUNCTIONAL_FP_OPS)
    if attn_fp:
        fp_ops.append("attention matmuls q@k^T and softmax@v of: " + ", ".join(attn_fp))
    return {
        "bits": recipe.bits.label,
        "recipe": recipe.to_dict(),
        "quantized_layers": layers,
        "quantized_matmuls": matmuls,
        "full_precision_modules": fp_modules,
        "full_precision_ops": fp_ops,
        "counts": {
            "quantized_layers": len(layers),
            "weight_quantized_layers": sum(1 for e in layers if e["weight"] != "fp"),
            "input_quantized_layers": sum(1 for e in layers if e["input"] != "fp"),
            "split_layers": sum(1 for e in layers if e["split"]),
            "quantized_matmuls": len(matmuls),
            "fp_modules": len(fp_modules),
            "fp_attention_matmuls": 2 * len(attn_fp),
            "weight_params_quantized": n_wq,
            "weight_params_fp": n_wfp,
        },
        "roles": {role: {"quantized": sum(1 for e in layers if e.get("role") == role),
                         "fp": sum(1 for e in fp_modules if e.get("role") == role)}
                  for role in sorted(set(roles.values()))},
    }


def torch_numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n
