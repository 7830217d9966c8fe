"""Turning an FP denoiser into a fake-quantized one, and initialising activation ranges.

Modules are replaced (Conv2d/Linear -> QuantLayer) and attention processors installed; the model
code is never edited. ``quantize_model`` returns a deep copy, so the FP model stays the reference.
"""
from __future__ import annotations

import copy
from typing import Iterator, Optional

import torch
from torch import nn

from ..errors import PtqbenchError
from ..interfaces import CalibSet, ModelAdapter
from .attention import QuantAttnProcessor
from .context import sampler_step
from .lsq import ActQuantizer
from .manifest import build_manifest
from .modules import QuantLayer
from .observer import RangeObserver
from .quantizer import init_range, scale_zero_point
from .recipe import QuantRecipe
from .roles import keep_fp_reason, layer_roles

#: attribute of a quantized model holding how it was built (read by save/load and reconstruction)
META_ATTR = "_ptqbench_quant"


# --------------------------------------------------------------------------------------------
# structure
# --------------------------------------------------------------------------------------------
def _attention_class():
    try:
        from diffusers.models.attention_processor import Attention
        return Attention
    except Exception:  # pragma: no cover - diffusers always present in this project
        return None


def first_last_layers(model: nn.Module, adapter: Optional[ModelAdapter] = None) -> tuple[str, str]:
    """Names of the layer reading the network input and the one producing its output."""
    if adapter is not None and hasattr(adapter, "first_last_layers"):
        return tuple(adapter.first_last_layers(model))
    names = dict(model.named_modules())
    if "conv_in" in names and "conv_out" in names:
        return "conv_in", "conv_out"
    layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    return (layers[0], layers[-1]) if layers else ("", "")


def shortcut_splits(model: nn.Module) -> dict[str, int]:
    """Split points of the 1x1 shortcut convs that read concat(features, skip) in up blocks.

    Follows diffusers' UNet data flow: the down path pushes conv_in's output and every down
    resnet / downsampler output on a stack; each up resnet pops one skip and concatenates it
    after its own input, so the first ``in_channels - skip`` channels are the features.
    """
    if not all(hasattr(model, a) for a in ("conv_in", "down_blocks", "up_blocks")):
        # a conditioning wrapper (ptqbench.conditioned) around the UNet
        inner = getattr(model, "unet", None)
        return ({} if inner is None else
                {f"unet.{k}": v for k, v in shortcut_splits(inner).items()})
    stack = [model.conv_in.out_channels]
    for down in model.down_blocks:
        for res in down.resnets:
            stack.append(res.out_channels)
        for ds in getattr(down, "downsamplers", None) or []:
            stack.append(ds.out_channels)
    splits = {}
    for i, up in enumerate(model.up_blocks):
        for j, res in enumerate(up.resnets):
            if not stack:
                return {}
            skip = stack.pop()
            split = res.in_channels - skip
            if getattr(res, "conv_shortcut", None) is not None and 0 < split < res.in_channels:
                splits[f"up_blocks.{i}.resnets.{j}.conv_shortcut"] = split
    return splits


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def quant_layers(model: nn.Module) -> Iterator[tuple[str, QuantLayer]]:
    for name, m in model.named_modules():
        if isinstance(m, QuantLayer):
            yield name, m


def act_quantizers(model: nn.Module) -> Iterator[tuple[str, ActQuantizer]]:
    for name, m in model.named_modules():
        if isinstance(m, ActQuantizer):
            yield name, m


def quant_meta(model: nn.Module) -> dict:
    meta = getattr(model, META_ATTR, None)
    if meta is None:
        raise PtqbenchError("model was not produced by ptqbench.quant.quantize_model")
    return meta


# --------------------------------------------------------------------------------------------
# quantize_model
# --------------------------------------------------------------------------------------------
def quantize_model(fp_model: nn.Module, recipe: QuantRecipe,
                   adapter: Optional[ModelAdapter] = None,
                   init_weight_ranges: bool = True) -> tuple[nn.Module, dict]:
    """A new model with fake-quant wrappers, weight ranges initialised, and its coverage manifest.

    ``init_weight_ranges=False`` skips the (MSE) range search; load_quantized uses it because the
    saved state overwrites the ranges anyway.
    """
    qmodel = copy.deepcopy(fp_model)
    qmodel.requires_grad_(False)
    first, last = first_last_layers(qmodel, adapter)
    roles = layer_roles(qmodel, adapter)
    splits = shortcut_splits(qmodel) if recipe.split_shortcut else {}
    layer_info: dict[str, dict] = {}
    fp_layers: dict[str, str] = {}

    if recipe.weight_quantized or recipe.act_quantized:
        targets = [(n, m) for n, m in qmodel.named_modules()
                   if isinstance(m, (nn.Conv2d, nn.Linear))]
        for name, layer in targets:
            role = "first" if name == first else "last" if name == last else None
            reason = keep_fp_reason(roles.get(name), recipe)
            if reason is not None:
                fp_layers[name] = reason
                continue
            if role is not None and recipe.first_last_fp:
                fp_layers[name] = f"{role} layer kept in full precision (recipe)"
                continue
            wbits = recipe.bits.weight if recipe.weight_quantized else None
            abits = recipe.bits.activation if recipe.act_quantized else None
            if role is not None and recipe.first_last_bits != "same":
                wbits = None if wbits is None else int(recipe.first_last_bits)
                abits = None if abits is None else int(recipe.first_last_bits)
            split = splits.get(name, 0)
            if isinstance(layer, nn.Conv2d) and layer.padding_mode != "zeros":
                fp_layers[name] = f"padding mode {layer.padding_mode!r} not supported"
                continue
            ql = QuantLayer(layer, wbits, abits, weight_mode=recipe.weight_mode,
                            weight_per_channel=recipe.weight_granularity == "channel",
                            act_mode=recipe.act_mode, act_steps=recipe.act_steps, split=split)
            _set_module(qmodel, name, ql)
            layer_info[name] = {"role": role or roles.get(name), "split": split}
            if init_weight_ranges and ql.weight_quantizers is not None:
                for wq in ql.weight_quantizers:
                    wq.init_range(recipe.weight_init, recipe.percentile, recipe.mse_p,
                                  recipe.mse_grid)

    attn_cls = _attention_class()
    attn_names = []
    if attn_cls is not None and recipe.act_quantized and recipe.quantize_attention:
        for name, m in qmodel.named_modules():
            if isinstance(m, attn_cls):
                dev = next(qmodel.parameters()).device
                m.set_processor(QuantAttnProcessor(recipe.matmul_bits, recipe.softmax_bits,
                                                   recipe.act_mode, recipe.act_steps, dev))
                attn_names.append(name)

    setattr(qmodel, META_ATTR, {"recipe": recipe.to_dict(), "fp_layers": fp_layers,
                                "attention": attn_names})
    manifest = build_manifest(qmodel, recipe, fp_layers, roles)
    return qmodel, manifest


# --------------------------------------------------------------------------------------------
# activation ranges
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def calibrate_activation_ranges(qmodel: nn.Module, adapter: ModelAdapter, calib: CalibSet,
                                batch_size: int, device, seed: int = 0) -> dict:
    """Initialise every activation quantizer's range on the calibration set.

    Statistics are taken with weights quantized and activations in FP (one pass over ``calib``);
    per-step quantizers get one range per sampler step from the samples of that step (steps
    absent from ``calib`` fall back to the pooled range). Returns a JSON-able summary.
    """
    recipe = QuantRecipe.from_dict(quant_meta(qmodel)["recipe"])
    quantizers = list(act_quantizers(qmodel))
    if not quantizers:
        return {"act_quantizers": 0}
    if batch_size < 1:
        raise PtqbenchError(f"calibration batch size must be >= 1, got {batch_size}")
    device = torch.device(device)
    observe_ranges(quantizers, recipe, seed)
    try:
        for start in range(0, len(calib), batch_size):
            sl = slice(start, start + batch_size)
            x = calib.x[sl].to(device)
            t = calib.t[sl].to(device)
            cond = None if calib.cond is None else calib.cond[sl].to(device)
            with sampler_step(calib.step[sl].to(device)):
                adapter.denoise(qmodel, x, t, cond)
        missing = apply_observed_ranges(quantizers, recipe)
    finally:
        for _, q in quantizers:
            q.observer = None
    for _, layer in quant_layers(qmodel):
        layer.clear_cache()
    return {"act_quantizers": len(quantizers), "samples": len(calib), "method": recipe.act_init,
            "steps_without_data": sorted({k for v in missing.values() for k in v})}


def observe_ranges(quantizers: list[tuple[str, ActQuantizer]], recipe, seed: int = 0) -> None:
    """Attach statistics observers: the quantizers pass values through (activations in FP)
    and record them until :func:`apply_observed_ranges`."""
    recipe = recipe if isinstance(recipe, QuantRecipe) else QuantRecipe.from_dict(recipe)
    sample = recipe.act_init in ("percentile", "mse")
    for i, (_, q) in enumerate(quantizers):
        q.observer = RangeObserver(q.num_steps, recipe.act_calib_elements, sample, seed + i)


def apply_observed_ranges(quantizers: list[tuple[str, ActQuantizer]], recipe
                          ) -> dict[str, list[int]]:
    """Set every observed quantizer's range (pooled, then per sampler step where that step had
    data); returns the per-step quantizers' steps without data (they keep the pooled range)."""
    recipe = recipe if isinstance(recipe, QuantRecipe) else QuantRecipe.from_dict(recipe)
    missing = {}
    for name, q in quantizers:
        obs = q.observer
        if obs.pooled.count == 0:
            raise PtqbenchError(f"activation quantizer {name} saw no data during "
                                "calibration (is the layer used by the forward pass?)")
        q.set_range(*_group_range(obs.pooled, q, recipe))
        absent = []
        for k, g in enumerate(obs.steps):
            if g.count == 0:
                absent.append(k)
            else:
                q.set_range(*_group_range(g, q, recipe), step=k)
        if absent:
            missing[name] = absent
    return missing


def _group_range(g, q: ActQuantizer, recipe: QuantRecipe):
    if recipe.act_init == "minmax":
        s, z = scale_zero_point(g.min.reshape(1), g.max.reshape(1), q.bits, q.mode)
    else:
        s, z = init_range(g.values[None], q.bits, q.mode, recipe.act_init, recipe.percentile,
                          recipe.mse_p, recipe.mse_grid, xmin=g.min.reshape(1),
                          xmax=g.max.reshape(1))
    return s.to(q.scale.device), z.to(q.scale.device)


@torch.no_grad()
def fold_weights(qmodel: nn.Module) -> int:
    """Fold every weight quantizer into integer codes (RTN or hardened AdaRound); returns count."""
    n = 0
    for _, layer in quant_layers(qmodel):
        for wq in layer.weight_quantizers or []:
            if wq.form != "folded":
                wq.fold()
                n += 1
        layer.clear_cache()
    return n
