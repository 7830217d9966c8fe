"""Roles of linear/conv layers that recipes treat specially (transformer and conditional models).

- ``time_embedding``: the timestep-embedding MLP and per-block time projections (UNets'
  ``time_embedding``/``time_emb_proj``, DiT's ``timestep_embedder``);
- ``adaln``: adaLN modulation layers, which turn the conditioning embedding into per-block
  shift/scale/gate (the ``linear`` of diffusers' ``AdaLayerNorm*``, plus whatever the adapter
  names, e.g. DiT's final ``proj_out_1``);
- ``text_encoder``: every layer under ``text_encoder.`` (Stable Diffusion's CLIP).

Layers found by module type, so any diffusers transformer is covered without name lists.
"""
from __future__ import annotations

from typing import Optional

from torch import nn


def _ada_norm_classes() -> tuple:
    try:
        from diffusers.models import normalization as N
    except Exception:  # pragma: no cover - diffusers always present here
        return ()
    names = ("AdaLayerNorm", "AdaLayerNormZero", "AdaLayerNormSingle", "AdaLayerNormContinuous",
             "AdaLayerNormZeroSingle", "AdaGroupNorm")
    return tuple(getattr(N, n) for n in names if hasattr(N, n))


def _timestep_embedding_classes() -> tuple:
    try:
        from diffusers.models.embeddings import TimestepEmbedding
    except Exception:  # pragma: no cover
        return ()
    return (TimestepEmbedding,)


def layer_roles(model: nn.Module, adapter=None) -> dict[str, str]:
    """name -> role for every Conv2d/Linear that has one (others are plain layers)."""
    ada, temb = _ada_norm_classes(), _timestep_embedding_classes()
    roles: dict[str, str] = {}
    for name, m in model.named_modules():
        if not name:
            continue
        role: Optional[str] = None
        if name == "text_encoder" or name.startswith("text_encoder."):
            role = "text_encoder"
        elif (temb and isinstance(m, temb)) or name.startswith("time_embedding") \
                or name.split(".")[-1] == "time_emb_proj":
            role = "time_embedding"
        elif ada and isinstance(m, ada):
            role = "adaln"
        if role is None:
            continue
        for sub, layer in m.named_modules(prefix=name):
            if isinstance(layer, (nn.Conv2d, nn.Linear)):
                # the innermost role wins (an embedding MLP inside an adaLN is time embedding)
                if roles.get(sub) is None or role == "time_embedding":
                    roles[sub] = role
    if adapter is not None and hasattr(adapter, "layer_roles"):
        roles.update(adapter.layer_roles(model))
    return roles


def keep_fp_reason(role: Optional[str], recipe) -> Optional[str]:
    """Why a layer of this role stays in full precision under ``recipe`` (None: quantize it)."""
    if role == "time_embedding" and not recipe.quantize_time_embedding:
        return "time embedding kept in full precision (recipe quantize_time_embedding)"
    if role == "adaln" and not recipe.quantize_adaln:
        return "adaLN modulation kept in full precision (recipe quantize_adaln)"
    if role == "text_encoder" and not recipe.quantize_text_encoder:
        return "text encoder kept in full precision (recipe quantize_text_encoder)"
    return None
