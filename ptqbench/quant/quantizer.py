"""Uniform affine quantization: integer grids, range initialisation, fake quantization.

Conventions (kept identical for weights and activations so tests can hand-compute them):
- ``asymmetric``: codes 0..2^b-1, scale = (max - min) / (2^b - 1), zero point = round(-min/scale);
  the range always contains 0 so that zero is exactly representable.
- ``symmetric``: codes -2^(b-1)..2^(b-1)-1, zero point 0, scale = absmax / (2^(b-1) - 1)
  (Q-Diffusion's signed convention: +-absmax map to +-(2^(b-1)-1)).
- ``unsigned``: codes 0..2^b-1, zero point 0, scale = max / (2^b - 1) (softmax outputs).

Range initialisers work on a 2-D view (rows = channels, or one row for per-tensor) and are
vectorised over rows: the MSE/Lp search loops over its candidate ranges, never over channels.
"""
from __future__ import annotations

import torch

MODES = ("asymmetric", "symmetric", "unsigned")
INIT_METHODS = ("minmax", "percentile", "mse")
MIN_SCALE = 1e-8
#: elements evaluated at once by the MSE search (candidates x rows x values)
_SEARCH_BUDGET = 1 << 20


def qrange(bits: int, mode: str) -> tuple[int, int]:
    """Integer code range [qmin, qmax] of a ``bits``-bit grid in ``mode``."""
    if mode == "symmetric":
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    if mode in ("asymmetric", "unsigned"):
        return 0, 2 ** bits - 1
    raise ValueError(f"unknown quantization mode {mode!r}")


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round() whose gradient is the identity (straight-through estimator)."""
    return (x.round() - x).detach() + x


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int,
               qmax: int) -> torch.Tensor:
    """Quantize-dequantize with STE rounding; gradients w.r.t. x (inside the range) and scale
    are those of LSQ (Esser et al. 2020): d/ds = round(x/s) - x/s inside, qmin-z / qmax-z outside."""
    q = torch.clamp(round_ste(x / scale) + zero_point, qmin, qmax)
    return (q - zero_point) * scale


def quantize_codes(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int,
                   qmax: int) -> torch.Tensor:
    """Integer codes (as float) of x: clamp(round(x/s) + z)."""
    return torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax)


def scale_zero_point(xmin: torch.Tensor, xmax: torch.Tensor, bits: int,
                     mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of the grid covering [xmin, xmax] (tensors of any matching shape)."""
    qmin, qmax = qrange(bits, mode)
    xmin = torch.minimum(xmin, torch.zeros_like(xmin))
    xmax = torch.maximum(xmax, torch.zeros_like(xmax))
    if mode == "symmetric":
        scale = torch.maximum(-xmin, xmax) / qmax
        zp = torch.zeros_like(scale)
    elif mode == "unsigned":
        scale = xmax / qmax
        zp = torch.zeros_like(scale)
    else:
        scale = (xmax - xmin) / (qmax - qmin)
        scale = scale.clamp_min(MIN_SCALE)
        zp = torch.clamp(torch.round(-xmin / scale), qmin, qmax)
    return scale.clamp_min(MIN_SCALE), zp


def _percentile_rows(x2d: torch.Tensor, q: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (low, high) nearest-rank percentiles; kthvalue has no size limit (quantile has)."""
    k = x2d.shape[1]
    hi_k = min(k, max(1, int(round(q * k))))
    lo_k = max(1, min(k, k - hi_k + 1))
    hi = torch.kthvalue(x2d, hi_k, dim=1).values
    lo = torch.kthvalue(x2d, lo_k, dim=1).values
    return lo, hi


def init_range(x2d: torch.Tensor, bits: int, mode: str, method: str = "minmax",
               percentile: float = 0.9999, p: float = 2.4, grid: int = 80,
               xmin: torch.Tensor | None = None,
               xmax: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point per row of ``x2d`` (shape (rows, K)); returns two (rows,) tensors.

    ``minmax``: the row's range. ``percentile``: the ``percentile`` / 1-``percentile`` values.
    ``mse``: BRECQ/Q-Diffusion's Lp search: candidates [min, max] * (1 - 0.01 i), i < ``grid``,
    scored by mean |x - Q(x)|^p (p = 2.4, after LAPQ); the first best candidate wins.
    ``xmin``/``xmax`` override the row extrema (activations: exact extrema of the whole
    calibration set, while ``x2d`` is a subsample of it).
    """
    x2d = x2d.detach().float()
    if method not in INIT_METHODS:
        raise ValueError(f"unknown range method {method!r}")
    if method == "percentile":
        lo, hi = _percentile_rows(x2d, percentile)
        return scale_zero_point(lo, hi, bits, mode)
    lo = x2d.min(dim=1).values if xmin is None else xmin.float()
    hi = x2d.max(dim=1).values if xmax is None else xmax.float()
    if method == "minmax":
        return scale_zero_point(lo, hi, bits, mode)
    qmin, qmax = qrange(bits, mode)
    # All candidates at once (chunked to bound memory): one kernel chain instead of `grid`.
    ratios = 1.0 - 0.01 * torch.arange(grid, device=x2d.device, dtype=x2d.dtype)
    rows, k = x2d.shape
    chunk = max(1, _SEARCH_BUDGET // max(1, rows * k))
    errs, scales, zps = [], [], []
    for c in range(0, grid, chunk):
        r = ratios[c:c + chunk, None]  # (g, 1)
        s, z = scale_zero_point(lo[None] * r, hi[None] * r, bits, mode)  # (g, rows)
        s3, z3 = s[..., None], z[..., None]
        xq = (quantize_codes(x2d[None], s3, z3, qmin, qmax) - z3) * s3
        errs.append((x2d[None] - xq).abs().pow(p).mean(dim=2))
        scales.append(s)
        zps.append(z)
    err, scale, zp = torch.cat(errs), torch.cat(scales), torch.cat(zps)
    best = err.argmin(dim=0, keepdim=True)  # first minimum = largest range among ties (BRECQ)
    return scale.gather(0, best)[0], zp.gather(0, best)[0]
