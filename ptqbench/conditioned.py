"""Denoisers that carry their own conditioning encoder, so quantization sees one module.

- :class:`ClassConditionedUNet`: LDM cin256 layout - a learned embedding of the class label
  (1000 classes + the null class) is the single cross-attention token of a
  ``UNet2DConditionModel`` (the original ``ClassEmbedder``: ``embedding(y)[:, None]``);
- :class:`TextConditionedUNet`: Stable Diffusion - the CLIP text encoder's last hidden state of
  the prompt's token ids is the cross-attention context.

Both take ``(x, t, cond)`` and return the noise prediction; ``blocks`` of their adapters prefix
``unet.``. Keeping the encoder inside the module lets the recipe decide whether it is quantized
(text encoder: FP by default) and lets save/load handle everything at once.
"""
from __future__ import annotations

import torch
from torch import nn


class ClassConditionedUNet(nn.Module):
    def __init__(self, unet: nn.Module, class_embedder: nn.Embedding):
        super().__init__()
        self.unet = unet
        self.class_embedder = class_embedder

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        context = self.class_embedder(labels)[:, None]
        return self.unet(x, t, encoder_hidden_states=context).sample


class TextConditionedUNet(nn.Module):
    def __init__(self, unet: nn.Module, text_encoder: nn.Module):
        super().__init__()
        self.unet = unet
        self.text_encoder = text_encoder

    def forward(self, x: torch.Tensor, t: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        context = self.text_encoder(token_ids)[0]
        return self.unet(x, t, encoder_hidden_states=context).sample


def unet_blocks(unet: nn.Module, prefix: str = "") -> list:
    """Reconstruction units of a diffusers UNet (UNet2DModel or UNet2DConditionModel) in
    forward order: ResNets, attention blocks, and for cross-attention ``Transformer2DModel``s
    (which return a tuple, not a tensor) their ``proj_in``, each ``BasicTransformerBlock`` and
    ``proj_out``; loose layers (time embedding, conv_in, samplers, conv_out) as single units."""
    from ptqbench.interfaces import Block

    out: list[Block] = []

    def add(name, module, kind):
        if module is not None:
            out.append(Block(prefix + name, module, kind))

    def add_attention(name, module):
        if hasattr(module, "transformer_blocks"):  # Transformer2DModel
            add(f"{name}.proj_in", module.proj_in, "layer")
            for k, blk in enumerate(module.transformer_blocks):
                add(f"{name}.transformer_blocks.{k}", blk, "transformer")
            add(f"{name}.proj_out", module.proj_out, "layer")
        else:
            add(name, module, "attention")

    add("time_embedding", getattr(unet, "time_embedding", None), "layer")
    add("conv_in", unet.conv_in, "layer")
    for i, down in enumerate(unet.down_blocks):
        attns = getattr(down, "attentions", None) or []
        for j, res in enumerate(down.resnets):
            add(f"down_blocks.{i}.resnets.{j}", res, "resnet")
            if j < len(attns):
                add_attention(f"down_blocks.{i}.attentions.{j}", attns[j])
        for j, ds in enumerate(getattr(down, "downsamplers", None) or []):
            add(f"down_blocks.{i}.downsamplers.{j}", ds, "layer")
    mid = unet.mid_block
    if mid is not None:
        attns = getattr(mid, "attentions", None) or []
        add("mid_block.resnets.0", mid.resnets[0], "resnet")
        for j, res in enumerate(mid.resnets[1:]):
            if j < len(attns) and attns[j] is not None:
                add_attention(f"mid_block.attentions.{j}", attns[j])
            add(f"mid_block.resnets.{j + 1}", res, "resnet")
    for i, up in enumerate(unet.up_blocks):
        attns = getattr(up, "attentions", None) or []
        for j, res in enumerate(up.resnets):
            add(f"up_blocks.{i}.resnets.{j}", res, "resnet")
            if j < len(attns):
                add_attention(f"up_blocks.{i}.attentions.{j}", attns[j])
        for j, us in enumerate(getattr(up, "upsamplers", None) or []):
            add(f"up_blocks.{i}.upsamplers.{j}", us, "layer")
    add("conv_out", unet.conv_out, "layer")
    return out
