"""Saving and loading quantized models, atomically.

A saved file holds the recipe, the form of every weight quantizer (rtn / adaround / folded) and
the full state_dict (integer codes, scales, zero points, activation step sizes), so loading
rebuilds the wrappers from the FP model + recipe, prepares each quantizer's form and loads the
state strictly: outputs are reproduced exactly.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..atomic import atomic_torch_save
from ..errors import PtqbenchError
from ..interfaces import ModelAdapter
from .model import quant_layers, quant_meta, quantize_model
from .recipe import QuantRecipe

FORMAT = "ptqbench-quant/1"


def weight_forms(qmodel: nn.Module) -> dict[str, str]:
    forms = {}
    for name, layer in quant_layers(qmodel):
        for i, wq in enumerate(layer.weight_quantizers or []):
            forms[f"{name}.weight_quantizers.{i}"] = wq.form
    return forms


def prepare_forms(qmodel: nn.Module, forms: dict[str, str]) -> None:
    for name, form in forms.items():
        try:
            wq = qmodel.get_submodule(name)
        except AttributeError as exc:
            raise PtqbenchError(f"saved quantized model has {name}, this model does not") from exc
        wq.prepare_form(form)


def save_quantized(qmodel: nn.Module, path) -> None:
    meta = quant_meta(qmodel)
    state = {k: v.detach().cpu() for k, v in qmodel.state_dict().items()}
    atomic_torch_save({"format": FORMAT, "recipe": meta["recipe"], "forms": weight_forms(qmodel),
                 "state_dict": state}, path)


def read_saved(path) -> dict:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise PtqbenchError(f"quantized model file not found: {path}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise PtqbenchError(f"{path} is not a ptqbench quantized model ({FORMAT})")
    return data


def load_quantized(fp_model: nn.Module, recipe: QuantRecipe, adapter: Optional[ModelAdapter],
                   path) -> nn.Module:
    """Rebuild the quantized model saved at ``path`` on top of ``fp_model`` (its device)."""
    data = read_saved(path)
    if data["recipe"] != recipe.to_dict():
        diff = sorted(k for k in set(data["recipe"]) | set(recipe.to_dict())
                      if data["recipe"].get(k) != recipe.to_dict().get(k))
        raise PtqbenchError(f"{path} was quantized with a different recipe (differs in: "
                            f"{', '.join(diff)})")
    qmodel, _ = quantize_model(fp_model, recipe, adapter, init_weight_ranges=False)
    load_state_into(qmodel, data)
    return qmodel


def load_state_into(qmodel: nn.Module, data: dict) -> None:
    prepare_forms(qmodel, data["forms"])
    try:
        qmodel.load_state_dict(data["state_dict"], strict=True)
    except RuntimeError as exc:
        raise PtqbenchError(f"saved quantized state does not match the model: {exc}") from exc
    qmodel.requires_grad_(False)
    for _, layer in quant_layers(qmodel):
        layer.clear_cache()
