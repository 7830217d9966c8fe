"""QuantLayer: the fake-quant replacement of an ``nn.Conv2d`` / ``nn.Linear``.

Inputs are quantized (Q-Diffusion quantizes layer inputs, which is what makes the shortcut split
possible); weights through :class:`WeightQuantizer`. With ``split`` > 0 (Q-Diffusion's shortcut
split) input channels [:split] and [split:] - the upsampled features and the skip features of a
concatenation - each get their own activation and weight quantizer.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .lsq import ActQuantizer
from .weight import WeightQuantizer


def _compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # pragma: no cover - old torch
        return False


class QuantLayer(nn.Module):
    def __init__(self, layer: nn.Module, weight_bits: Optional[int], act_bits: Optional[int],
                 weight_mode: str = "asymmetric", weight_per_channel: bool = True,
                 act_mode: str = "asymmetric", act_steps: int = 1, split: int = 0):
        """``weight_bits``/``act_bits`` None = keep that side in full precision."""
        super().__init__()
        if isinstance(layer, nn.Conv2d):
            self.kind = "conv2d"
            self.conv_kwargs = dict(stride=layer.stride, padding=layer.padding,
                                    dilation=layer.dilation, groups=layer.groups)
            if layer.padding_mode != "zeros":
                raise ValueError("QuantLayer supports zero padding only")
        elif isinstance(layer, nn.Linear):
            self.kind = "linear"
            self.conv_kwargs = {}
        else:
            raise TypeError(f"cannot quantize {type(layer).__name__}")
        if split and (self.kind != "conv2d" or layer.groups != 1
                      or not 0 < split < layer.weight.shape[1]):
            raise ValueError(f"invalid split {split} for {layer}")
        self.split = int(split)
        self.in_features = layer.weight.shape[1]
        self.out_features = layer.weight.shape[0]
        w = layer.weight.detach()
        parts = [w] if not self.split else [w[:, :self.split], w[:, self.split:]]
        if weight_bits is None:
            self.weight_quantizers = None
            self.weight = nn.Parameter(w.clone(), requires_grad=False)
        else:
            self.weight_quantizers = nn.ModuleList(
                WeightQuantizer(p.contiguous(), weight_bits, weight_mode, weight_per_channel)
                for p in parts)
        self.bias = (None if layer.bias is None
                     else nn.Parameter(layer.bias.detach().clone(), requires_grad=False))
        if act_bits is None:
            self.act_quantizers = None
        else:
            self.act_quantizers = nn.ModuleList(
                ActQuantizer(act_bits, act_mode, act_steps, device=w.device)
                for _ in range(2 if self.split else 1))
        self._wcache: Optional[tuple] = None  # (key, dequantized weight) for inference

    # ---- weight ------------------------------------------------------------------------
    def _dequant_weight(self) -> torch.Tensor:
        ws = [q() for q in self.weight_quantizers]
        return ws[0] if len(ws) == 1 else torch.cat(ws, dim=1)

    def quantized_weight(self) -> torch.Tensor:
        """The fake-quantized weight; cached between calls when nothing can change it or needs
        its gradient (sampling), keyed on the storage and version of every state tensor."""
        if self.weight_quantizers is None:
            return self.weight
        if _compiling():
            return self._dequant_weight()
        state = [t for q in self.weight_quantizers for t in q.state_tensors()]
        if torch.is_grad_enabled() and any(t.requires_grad for t in state):
            self._wcache = None
            return self._dequant_weight()
        try:
            key = tuple((t.data_ptr(), t._version, t.device) for t in state)
        except RuntimeError:  # inference tensors have no version counter: do not cache
            return self._dequant_weight()
        if self._wcache is not None and self._wcache[0] == key:
            return self._wcache[1]
        w = self._dequant_weight().detach()
        self._wcache = (key, w)
        return w

    def clear_cache(self) -> None:
        self._wcache = None

    # ---- forward -----------------------------------------------------------------------
    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_quantizers is None:
            return x
        if not self.split:
            return self.act_quantizers[0](x)
        return torch.cat([self.act_quantizers[0](x[:, :self.split]),
                          self.act_quantizers[1](x[:, self.split:])], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.quantize_input(x)
        w = self.quantized_weight()
        if self.kind == "conv2d":
            return F.conv2d(x, w, self.bias, **self.conv_kwargs)
        return F.linear(x, w, self.bias)

    def _apply(self, fn, *args, **kwargs):
        self._wcache = None  # device/dtype moves invalidate the cached weight
        return super()._apply(fn, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"{self.kind}, in={self.in_features}, out={self.out_features}, split={self.split}"
