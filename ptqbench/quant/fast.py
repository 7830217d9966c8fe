"""Fast simulated-quantization execution for sampling: same numbers as the reference path.

The reference quantized model (``QuantLayer`` / ``ActQuantizer``) is built for calibration: it
dequantizes weights on demand, keeps STE rounding for gradients and reads the sampler step from a
context variable. Sampling needs none of that, and pays for it. :func:`prepare_for_sampling`
builds a separate inference copy:

- every ``QuantLayer`` becomes a :class:`FoldedLayer` holding its dequantized weight, computed
  once (the same tensor the reference path multiplies with, so the same products);
- every ``ActQuantizer`` becomes a :class:`FastActQuant`: the same fake-quant arithmetic
  (``clamp(round(x / s) + z) - z) * s``, no STE, no Python branching per call), which
  ``torch.compile`` fuses into the surrounding pointwise kernels;
- per-step activation parameters are tables indexed by one shared device tensor, the *step
  index*, written in place before each call: no recompiles, and CUDA graphs replay it;
- optionally the whole denoiser call is compiled and replayed as a CUDA graph per input shape.

The FP model goes through the same treatment (cast, channels_last, compile, graphs), so the FP
reference and the quantized model are timed and computed alike. Numerics are explicit:
:class:`Execution` says dtype, TF32, compile, CUDA graphs and channels_last, resolves "auto"
against the device, and is what records store. fp32 without TF32 reproduces the reference eager
path within fp32 rounding (bit for bit on CPU eager; tests check it); bf16 or TF32 change the
numbers and therefore also the keys of the samples (:meth:`Execution.identity`).
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import PtqbenchError
from .lsq import ActQuantizer
from .modules import QuantLayer

EXECUTION_MODES = ("auto", "reference", "fast", "int8")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
OPTION_DOCS = {
    "compile": "torch.compile the denoiser call: true, false, or 'auto' (on CUDA only)",
    "cuda_graphs": "replay each denoiser call as a CUDA graph: true, false, 'auto' (on CUDA)",
    "dtype": "'fp32' (default: equals the reference path within fp32 rounding) or 'bf16'",
    "tf32": "TF32 matmuls/convolutions (default false: strict fp32, as the FID features)",
    "channels_last": "NHWC activations: true, false, 'auto' (with bf16 on CUDA)",
    "int8_convs": "int8 execution: run k x k convolutions as int8 implicit GEMMs (default "
                  "true); false keeps them in simulated quantization (listed as such)",
    "int8_check_samples": "int8 execution: sample this many (default 256, 0 = off) also with "
                          "the simulated fast path and report their paired MSE",
}


# --------------------------------------------------------------------------------------------
# numerics settings
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Execution:
    """How sampling executes the denoiser; ``resolved`` turns 'auto' into concrete choices."""

    mode: str = "auto"
    compile: Any = "auto"
    cuda_graphs: Any = "auto"
    dtype: str = "fp32"
    tf32: bool = False
    channels_last: Any = "auto"
    int8_convs: bool = True
    int8_check_samples: int = 256

    @classmethod
    def from_options(cls, mode: str = "auto", options: Optional[dict] = None) -> "Execution":
        """Validated settings; a bad value raises PtqbenchError naming the option."""
        options = dict(options or {})
        if mode not in EXECUTION_MODES:
            raise PtqbenchError(f"execution must be one of {', '.join(EXECUTION_MODES)}, "
                                f"got {mode!r}")
        unknown = sorted(set(options) - set(OPTION_DOCS))
        if unknown:
            raise PtqbenchError(f"unknown execution option(s) {', '.join(unknown)}; known: "
                                f"{', '.join(sorted(OPTION_DOCS))}")
        for k in ("compile", "cuda_graphs", "channels_last"):
            if k in options and options[k] not in ("auto", True, False):
                raise PtqbenchError(f"execution option {k} must be true, false or 'auto', "
                                    f"got {options[k]!r}")
        for k in ("tf32", "int8_convs"):
            if k in options and not isinstance(options[k], bool):
                raise PtqbenchError(f"execution option {k} must be true or false, "
                                    f"got {options[k]!r}")
        n = options.get("int8_check_samples", 0)
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise PtqbenchError(f"execution option int8_check_samples must be an integer >= 0, "
                                f"got {n!r}")
        if "dtype" in options and options["dtype"] not in DTYPES:
            raise PtqbenchError(f"execution option dtype must be one of {', '.join(DTYPES)}, "
                                f"got {options['dtype']!r}")
        return cls(mode=mode, **options)

    def resolved(self, device, quantized: bool = True) -> "Execution":
        """Concrete settings for ``device``: 'auto' is the fast path, compiled and graphed on
        CUDA and folded-eager on CPU (compiling costs more than it saves on a CPU test run).
        int8 on a model without quantized layers (the FP cell) is the fast path.
        In deterministic mode (``torch.are_deterministic_algorithms_enabled()``, set per cell
        by ``[run] deterministic``) 'auto' does not compile: inductor may pick kernel configs by
        timing them, which torch's deterministic flag does not cover, so two runs could round
        differently; CUDA graphs replay fixed kernels and stay. ``compile = true`` still
        compiles."""
        cuda = torch.device(device).type == "cuda"
        may_compile = cuda and not torch.are_deterministic_algorithms_enabled()
        mode = "fast" if self.mode == "auto" else self.mode
        if mode == "int8" and not quantized:
            mode = "fast"
        pick = (lambda v, default: default if v == "auto" else bool(v))
        fast = mode != "reference"
        return dataclasses.replace(
            self, mode=mode,
            compile=fast and pick(self.compile, may_compile),
            cuda_graphs=fast and cuda and pick(self.cuda_graphs, cuda),
            channels_last=fast and pick(self.channels_last, cuda and self.dtype == "bf16"))

    def record(self) -> dict:
        return dataclasses.asdict(self)

    def identity(self, quantized: bool) -> Optional[dict]:
        """What of these settings changes samples beyond fp32 rounding (part of the samples' key);
        None when nothing does, so exact fast paths keep the reference path's keys."""
        out = {}
        if self.dtype != "fp32":
            out["dtype"] = self.dtype
        if self.tf32:
            out["tf32"] = True
        if quantized and self.mode == "int8":
            out["int8"] = {"convs": bool(self.int8_convs)}
        return out or None

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


# --------------------------------------------------------------------------------------------
# inference modules
# --------------------------------------------------------------------------------------------
def new_step_index(device) -> torch.Tensor:
    """The shared step index read by per-step activation tables (written before each call)."""
    return torch.zeros(1, dtype=torch.long, device=device)


class FastActQuant(nn.Module):
    """Inference copy of an ActQuantizer: same arithmetic, parameters as plain fp32 tables."""

    def __init__(self, q: ActQuantizer, step_index: Optional[torch.Tensor]):
        super().__init__()
        self.bits, self.mode, self.num_steps = q.bits, q.mode, q.num_steps
        self.qmin, self.qmax = q.qmin, q.qmax
        self.register_buffer("scale", q.scale.detach().float().clone())
        self.register_buffer("zero_point", q.zero_point.detach().float().clone())
        if self.num_steps > 1:
            if step_index is None:
                raise ValueError("per-step activation parameters need a step index")
            # the same tensor object in every quantizer: one in-place write selects the step
            self.register_buffer("step_index", step_index, persistent=False)
        else:
            self.step_index = None

    def params(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.step_index is None:
            return self.scale, self.zero_point
        return (self.scale.index_select(0, self.step_index),
                self.zero_point.index_select(0, self.step_index))

    def codes(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Integer codes (float) of x and the (scale, zero point) used."""
        s, z = self.params()
        return torch.clamp(torch.round(x.float() / s) + z, self.qmin, self.qmax), s, z

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, s, z = self.codes(x)
        return ((q - z) * s).to(x.dtype)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, mode={self.mode}, num_steps={self.num_steps}"


class FoldedLayer(nn.Module):
    """Inference copy of a QuantLayer: dequantized weight computed once, inputs fake-quantized."""

    def __init__(self, layer: QuantLayer, step_index: Optional[torch.Tensor]):
        super().__init__()
        self.kind, self.conv_kwargs, self.split = layer.kind, dict(layer.conv_kwargs), layer.split
        self.in_features, self.out_features = layer.in_features, layer.out_features
        with torch.no_grad():
            w = (layer.weight if layer.weight_quantizers is None else layer._dequant_weight())
        self.register_buffer("weight", w.detach().clone())
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().clone())
        self.act = (None if layer.act_quantizers is None else nn.ModuleList(
            FastActQuant(q, step_index) for q in layer.act_quantizers))
        if layer.act_quantizers is not None and not all(q.enabled for q in layer.act_quantizers):
            self.act = None  # the reference layer passes its inputs through

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.act is None:
            return x
        if not self.split:
            return self.act[0](x)
        return torch.cat([self.act[0](x[:, :self.split]), self.act[1](x[:, self.split:])], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.quantize_input(x)
        if self.kind == "conv2d":
            return F.conv2d(x, self.weight, self.bias, **self.conv_kwargs)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{self.kind}, in={self.in_features}, out={self.out_features}, split={self.split}"


def _set_child(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def _cast_floating(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast parameters/buffers to ``dtype`` except quantizer tables and int8 layers' state
    (scales stay fp32: a bf16 scale would move every quantization grid)."""
    from .int8 import Int8Layer, _Part

    keep = (FastActQuant, Int8Layer, _Part)
    for m in model.modules():
        if isinstance(m, keep):
            continue
        for name, p in list(m._parameters.items()):
            if p is not None and p.is_floating_point() and p.dtype != dtype:
                m._parameters[name] = nn.Parameter(p.detach().to(dtype), requires_grad=False)
        for name, b in list(m._buffers.items()):
            if b is not None and b.is_floating_point() and b.dtype != dtype:
                m._buffers[name] = b.to(dtype)


@dataclass
class PreparedModel:
    """An inference copy of a model and what was done to it."""

    model: nn.Module
    step_index: Optional[torch.Tensor]  # None: no per-step activation parameters
    execution: Execution
    manifest: dict


@torch.no_grad()
def prepare_for_sampling(model: nn.Module, execution: Execution) -> PreparedModel:
    """A new model for sampling under resolved ``execution`` (the given model is untouched).

    Quantized layers are folded (mode 'fast') or run on int8 kernels where supported (mode
    'int8'); FP models are only cast / re-laid out. The manifest lists what executes how.
    """
    if execution.mode == "reference":
        return PreparedModel(model, None, execution, {"mode": "reference"})
    from .int8 import Int8Layer, int8_support

    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = next(model.buffers()).device
    fast = copy.deepcopy(model)
    per_step = any(isinstance(m, ActQuantizer) and m.num_steps > 1 for m in model.modules())
    step_index = new_step_index(device) if per_step else None
    int8_layers, simulated = [], []
    for name, m in list(fast.named_modules()):
        if isinstance(m, QuantLayer):
            reason = None
            if execution.mode == "int8":
                reason = int8_support(m, convs=execution.int8_convs)
                if reason is None:
                    _set_child(fast, name, Int8Layer(m, step_index))
                    int8_layers.append(name)
                    continue
                simulated.append({"name": name, "reason": reason})
            _set_child(fast, name, FoldedLayer(m, step_index))
    for name, m in list(fast.named_modules()):
        for child_name, child in list(m.named_children()):
            if isinstance(child, ActQuantizer):
                setattr(m, child_name, FastActQuant(child, step_index) if child.enabled
                        else nn.Identity())
    if execution.mode == "int8":
        fp_reasons = getattr(model, "_ptqbench_quant", {}).get("fp_layers", {})
        simulated += [{"name": n, "reason": fp_reasons.get(n, "not quantized")}
                      for n, m in fast.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        attn = [n for n, m in fast.named_modules() if type(m).__name__ == "QuantAttnProcessor"]
        simulated += [{"name": n, "reason": "attention matmuls q@k^T, softmax@v run in "
                                            "simulated quantization"} for n in attn]
    if execution.dtype != "fp32":
        _cast_floating(fast, execution.torch_dtype)
    if execution.channels_last:
        fast = fast.to(memory_format=torch.channels_last)
    manifest = {"mode": execution.mode, "per_step_tables": per_step,
                "folded_layers": sum(isinstance(m, FoldedLayer) for m in fast.modules())}
    if execution.mode == "int8":
        manifest.update(int8_layers=int8_layers, simulated_layers=simulated)
    return PreparedModel(fast, step_index, execution, manifest)


# --------------------------------------------------------------------------------------------
# the denoiser call
# --------------------------------------------------------------------------------------------
class FastDenoiser:
    """``denoise(x, t, k, cond)`` for the sampler: sets the step index, then runs the prepared model
    eagerly, compiled, and/or replayed from one CUDA graph per input shape. Returns fp32.

    ``call(model, x, t, cond)`` is the adapter's denoise (e.g. ``adapter.denoise``).
    """

    def __init__(self, prepared: PreparedModel, call: Callable, cond: Optional[torch.Tensor] = None):
        self.prepared, self.cond = prepared, cond
        self.ex = prepared.execution
        model = prepared.model

        def fn(x, t, c):
            return call(model, x, t, c)

        if self.ex.compile:
            # one compiled denoiser per cell: earlier cells' compiled code (guarded on their
            # models) is dead weight and would count against dynamo's recompile limit
            torch._dynamo.reset()
        self.fn = torch.compile(fn, dynamic=False) if self.ex.compile else fn
        self.graphs: dict = {}
        self.pool = None

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.ex.torch_dtype)
        if self.ex.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def __call__(self, x: torch.Tensor, t: torch.Tensor, k: int,
                 cond: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.prepared.step_index is not None:
            self.prepared.step_index.fill_(int(k))
        cond = self.cond if cond is None else cond
        x = self._input(x)
        with _precision(self.ex.tf32):
            if self.ex.cuda_graphs and x.is_cuda:
                return self._replay(x, t, cond)
            return self.fn(x, t, cond).float()

    def _replay(self, x, t, cond) -> torch.Tensor:
        key = (tuple(x.shape), tuple(t.shape), None if cond is None else tuple(cond.shape))
        entry = self.graphs.get(key)
        if entry is None:
            entry = self._capture(x, t, cond)
            self.graphs[key] = entry
        graph, sx, st, sc, out = entry
        sx.copy_(x)
        st.copy_(t)
        if sc is not None:
            sc.copy_(cond)
        graph.replay()
        return out.float().clone()  # the graph's output buffer is overwritten by the next replay

    def _capture(self, x, t, cond):
        sx, st = x.clone(), t.clone()
        sc = None if cond is None else cond.clone()
        side = torch.cuda.Stream(device=x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):
            for _ in range(3):  # compile, autotune and allocate outside the capture
                self.fn(sx, st, sc)
        torch.cuda.current_stream(x.device).wait_stream(side)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self.fn(sx, st, sc)
        return graph, sx, st, sc, out


def _precision(tf32: bool):
    from ..metrics.inception import fp32_precision

    return fp32_precision(allow_tf32=tf32)


def make_denoiser(adapter, model: nn.Module, execution: Execution, device,
                  quantized: bool) -> tuple[Callable, dict]:
    """The sampler's ``denoise(x, t, k, cond=None)`` for ``model`` under ``execution`` (resolved
    here): one step's guided output (``adapter.guided_denoise``; for an unconditional adapter the
    plain model call), and the record of what ran: the resolved settings and the manifest. Use it
    with ``adapter.run_sampler``, which draws each sample's conditioning."""
    from .context import sampler_step

    ex = execution.resolved(device, quantized)
    if ex.mode == "reference":
        def denoise(x, t, k, cond=None):
            with sampler_step(k), _precision(ex.tf32):
                return adapter.guided_denoise(model, x, t, cond)
        return denoise, {"execution": ex.record(), "manifest": {"mode": "reference"}}
    prepared = prepare_for_sampling(model, ex)
    # the guidance passes (one batch) and their combination run inside the compiled / graphed call
    fd = FastDenoiser(prepared, adapter.guided_denoise)
    return (lambda x, t, k, cond=None: fd(x, t, k, cond)), {"execution": ex.record(),
                                                             "manifest": prepared.manifest}


# --------------------------------------------------------------------------------------------
# record fields
# --------------------------------------------------------------------------------------------
def sampling_cost(timer, stage: str, num_samples: int, steps: int, numerics: dict) -> dict:
    """Throughput and peak memory of a sampling stage (None throughput when every shard was
    reused from an earlier run: nothing was timed)."""
    seconds = timer.seconds.get(stage)
    ran = "manifest" in numerics
    out = {"seconds": None if seconds is None else round(seconds, 3),
           "img_steps_per_s": (round(num_samples * steps / seconds, 1)
                               if ran and seconds else None),
           "peak_gpu_mb": getattr(timer, "peak_gpu_mb", {}).get(stage)}
    host = getattr(timer, "peak_host_mb", {}).get(stage)
    if host is not None:
        out["peak_host_mb"] = host
    return out


@torch.no_grad()
def int8_check(adapter, model: nn.Module, spec, seed: int, batch_size: int, device,
               execution: Execution) -> dict:
    """Paired difference between int8 samples and the simulated (fast fp32) samples of the same
    seeds: the first ``int8_check_samples`` sample indices, both ways."""
    n = int(execution.int8_check_samples)
    if n == 0:
        return {"samples": 0}
    simulated = dataclasses.replace(execution, mode="fast", dtype="fp32", tf32=False)
    sampler = adapter.make_sampler(spec)  # the adapter's loop: its sampler kind and guidance
    outs = {}
    for name, ex in (("int8", execution), ("simulated", simulated)):
        denoise, _ = make_denoiser(adapter, model, ex, device, True)
        parts = []
        for start in range(0, n, batch_size):
            idx = range(start, min(n, start + batch_size))
            with torch.inference_mode():
                parts.append(adapter.run_sampler(denoise, spec, idx, seed, torch.device(device),
                                                 sampler=sampler).float().cpu())
        outs[name] = torch.cat(parts)
    diff = outs["int8"] - outs["simulated"]
    img = (adapter.decode(outs["int8"]).float() - adapter.decode(outs["simulated"]).float()) / 255
    return {"samples": n, "paired_mse_vs_simulated": float((diff ** 2).mean()),
            "paired_mse_uint8_vs_simulated": float((img ** 2).mean()),
            "max_abs_diff": float(diff.abs().max())}
