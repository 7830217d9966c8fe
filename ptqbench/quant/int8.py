"""Real int8 execution of calibrated quantized layers (W8A8, and W4A8 as 4-bit values on int8).

A quantized layer computes y = sum_i W^(o,i) x^(i) with W^ = s_w (w_q - z_w) per output channel
and x^ = s_a (a_q - z_a) per tensor. Codes are shifted into int8 (``w_s = w_q - o_w``, ``a_s =
a_q - o_a``, o = 2^(b-1) for unsigned grids, 0 for signed ones; z' = z - o), and

    y_o = s_w,o s_a [ sum_i w_s a_s  - z'_a sum_i w_s,oi  - z'_w,o sum_i a_s,i  + K z'_w,o z'_a ]

whose bracket is exact in int32: ``torch._int_mm`` computes the first sum, the others are row and
column sums. The result equals the simulated layer up to fp32 rounding of its accumulation (the
int8 path is the exact one). 4-bit weights are int8 values in [-8, 7]: exact numerics, int8
speed. Linear layers are one GEMM; convolutions an implicit GEMM over unfolded patches (1x1
convolutions need no unfolding). Zero padding is zero in the *dequantized* domain, i.e. the code
z'_a, so patches are unfolded from a_s - z'_a (zero there) and shifted back.

No extra package is needed (``torch._int_mm`` exists since torch 2.1 on CPU and CUDA).
Layers this cannot run (FP sides, > 8 bits, grouped convolutions, soft AdaRound) stay in
simulated quantization and are listed with the reason by :func:`int8_support`.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .modules import QuantLayer

#: largest reduction length whose worst-case int32 bracket cannot overflow (4 K 2^14 < 2^31)
MAX_K = 32767
#: elements of the unfolded patch matrix processed at once (bounds the implicit GEMM's memory)
PATCH_ELEMENTS = 1 << 27


def _is_pointwise(layer) -> bool:
    kw = layer.conv_kwargs
    return (tuple(kw["stride"]) == (1, 1) and tuple(kw["padding"]) == (0, 0)
            and tuple(kw["dilation"]) == (1, 1))


def int8_support(layer: QuantLayer, convs: bool = True) -> Optional[str]:
    """None when ``layer`` can run on int8 kernels, else the reason it stays simulated."""
    if layer.weight_quantizers is None:
        return "weights kept in full precision"
    if layer.act_quantizers is None or not all(q.enabled for q in layer.act_quantizers):
        return "inputs kept in full precision"
    if any(q.bits > 8 for q in layer.weight_quantizers) or any(q.bits > 8
                                                               for q in layer.act_quantizers):
        return "more than 8 bits"
    if any(q.form == "adaround" and q.soft for q in layer.weight_quantizers):
        return "soft AdaRound rounding (weights not folded)"
    if layer.kind == "conv2d":
        if any(isinstance(v, str) for v in layer.conv_kwargs.values()):
            return "string padding mode"
        if layer.conv_kwargs["groups"] != 1:
            return "grouped convolution"
        if not convs and not _is_pointwise(layer):
            return "k x k convolution kept in simulated quantization (int8_convs = false)"
    red = max(_prod(q.weight_shape[1:]) for q in layer.weight_quantizers)
    if red > MAX_K:
        return f"reduction length {red} too long for exact int32 accumulation"
    return None


def _prod(shape) -> int:
    n = 1
    for v in shape:
        n *= int(v)
    return n


def _offset(qmin: int, bits: int) -> int:
    return 2 ** (bits - 1) if qmin >= 0 else 0


def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


class _Part(nn.Module):
    """One input-channel group of an int8 layer (the whole layer, or one half of a split)."""

    def __init__(self, wq, act):
        super().__init__()
        with torch.no_grad():
            if wq.form == "adaround":
                codes = wq._codes().round()
            elif wq.form == "rtn":
                from .quantizer import quantize_codes
                codes = quantize_codes(wq.weight, wq.scale, wq.zero_point, wq.qmin, wq.qmax)
            else:
                codes = wq.w_int.float()
            o_w = _offset(wq.qmin, wq.bits)
            w_s = (codes - o_w).reshape(codes.shape[0], -1)  # (O, K)
            out, k = w_s.shape
            zw = (wq.zero_point.reshape(-1) - o_w).round().expand(out)
            sw = wq.scale.reshape(-1).float().expand(out)
        self.k, self.out = k, out
        self.kpad, self.npad = _round_up(k, 8), _round_up(out, 8)
        w8 = torch.zeros(self.npad, self.kpad, dtype=torch.int8, device=w_s.device)
        w8[:out, :k] = w_s.to(torch.int8)
        # (N, K) row-major, used transposed: the column-major B operand int8 GEMMs want
        self.register_buffer("w8", w8)
        self.register_buffer("wsum", w_s.sum(dim=1).to(torch.int32))
        self.register_buffer("zw", zw.to(torch.int32).contiguous())
        self.register_buffer("sw", sw.contiguous().clone())
        self.act = act
        self.o_a = _offset(act.qmin, act.bits)

    def gemm(self, a: torch.Tensor, za: torch.Tensor, sa: torch.Tensor) -> torch.Tensor:
        """fp32 (M, out) from int8 patches a (M, K) with activation zero point za (int32)."""
        m = a.shape[0]
        asum = a.sum(dim=1, dtype=torch.int32)
        mpad = max(m, 17)
        if mpad != m or self.kpad != self.k:
            a = F.pad(a, (0, self.kpad - self.k, 0, mpad - m))
        acc = torch._int_mm(a.contiguous(), self.w8.t())[:m, :self.out]
        total = (acc - za * self.wsum[None] - self.zw[None] * asum[:, None]
                 + self.k * self.zw[None] * za)
        return total.float() * (self.sw[None] * sa)


class Int8Layer(nn.Module):
    """A QuantLayer executed on int8 GEMMs (see the module docstring for the arithmetic)."""

    def __init__(self, layer: QuantLayer, step_index: Optional[torch.Tensor]):
        super().__init__()
        from .fast import FastActQuant

        reason = int8_support(layer)
        if reason is not None:
            raise ValueError(f"layer cannot run in int8: {reason}")
        self.kind, self.conv_kwargs, self.split = layer.kind, dict(layer.conv_kwargs), layer.split
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.kernel = tuple(layer.weight_quantizers[0].weight_shape[2:])
        self.pointwise = self.kind == "linear" or _is_pointwise(layer)
        self.parts = nn.ModuleList(_Part(wq, FastActQuant(aq, step_index))
                                   for wq, aq in zip(layer.weight_quantizers,
                                                     layer.act_quantizers))
        self.register_buffer("bias", None if layer.bias is None
                             else layer.bias.detach().float().clone())

    def _signed(self, part: _Part, x: torch.Tensor):
        codes, s, z = part.act.codes(x)
        za = (z - part.o_a).round().to(torch.int32)
        return codes, s, z, za

    def _linear(self, x: torch.Tensor) -> torch.Tensor:
        part = self.parts[0]
        codes, s, _, za = self._signed(part, x)
        a = (codes - part.o_a).to(torch.int8).reshape(-1, x.shape[-1])
        y = part.gemm(a, za, s)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def _conv_rows(self, part: _Part, x: torch.Tensor) -> torch.Tensor:
        """fp32 (N*Ho*Wo, out) of one part's convolution."""
        codes, s, z, za = self._signed(part, x)
        n = x.shape[0]
        if self.pointwise:
            a = (codes - part.o_a).to(torch.int8).permute(0, 2, 3, 1).reshape(-1, x.shape[1])
            return part.gemm(a, za, s)
        kw = self.conv_kwargs
        centred = codes - z  # zero where the dequantized input is zero, padding included
        dt = torch.float16 if x.is_cuda else torch.float32  # |values| <= 255: exact in both
        per_sample = part.k * _out_pixels(x.shape[-2:], self.kernel, kw)
        step = max(1, PATCH_ELEMENTS // max(per_sample, 1))
        rows = []
        for i in range(0, n, step):
            cols = F.unfold(centred[i:i + step].to(dt), self.kernel, dilation=kw["dilation"],
                            padding=kw["padding"], stride=kw["stride"])  # (b, K, L)
            a = (cols.transpose(1, 2) + (z - part.o_a).to(dt)).reshape(-1, part.k)
            rows.append(part.gemm(a.to(torch.int8), za, s))
        return torch.cat(rows) if len(rows) > 1 else rows[0]

    def _conv(self, x: torch.Tensor) -> torch.Tensor:
        xs = [x] if not self.split else [x[:, :self.split], x[:, self.split:]]
        y = None
        for part, xp in zip(self.parts, xs):
            r = self._conv_rows(part, xp)
            y = r if y is None else y + r
        if self.bias is not None:
            y = y + self.bias
        ho, wo = _out_size(x.shape[-2:], self.kernel, self.conv_kwargs)
        return y.reshape(x.shape[0], ho, wo, self.out_features).permute(0, 3, 1, 2).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._linear(x) if self.kind == "linear" else self._conv(x)

    def extra_repr(self) -> str:
        return (f"{self.kind}, in={self.in_features}, out={self.out_features}, "
                f"split={self.split}, int8")


def _out_size(hw, kernel, kw) -> tuple[int, int]:
    out = []
    for d in range(2):
        size = hw[d] + 2 * kw["padding"][d] - kw["dilation"][d] * (kernel[d] - 1) - 1
        out.append(size // kw["stride"][d] + 1)
    return out[0], out[1]


def _out_pixels(hw, kernel, kw) -> int:
    ho, wo = _out_size(hw, kernel, kw)
    return ho * wo
