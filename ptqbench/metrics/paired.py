"""Per-sample errors of paired samples (same seeds) and a paired test between two methods.

Cells of one suite start sample i from the same x_T, so two methods' errors against the FP samples
can be compared sample by sample: the paired difference has far less variance than either
method's own interval, and is what decides whether two methods differ.
"""
from __future__ import annotations

import math

import numpy as np
import torch


def _pairs(samples: torch.Tensor, fp: torch.Tensor, chunk: int):
    """(samples, FP samples) as float64 grey levels, ``chunk`` at a time (bounded memory)."""
    for start in range(0, samples.shape[0], chunk):
        a = samples[start:start + chunk].to(torch.float64)
        yield a, fp[start:start + chunk].to(a.device, torch.float64)


def _errors(samples: torch.Tensor, fp: torch.Tensor, chunk: int):
    """(sample - fp) / 255 in float64, ``chunk`` samples at a time."""
    for a, b in _pairs(samples, fp, chunk):
        yield (a - b) / 255.0


def per_sample_mse(samples: torch.Tensor, fp: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """MSE of every sample against its FP counterpart, images scaled to [0, 1] (float64, (N,))."""
    return torch.cat([e.square().flatten(1).mean(1).cpu() for e in _errors(samples, fp, chunk)])


def systematic_error(samples: torch.Tensor, fp: torch.Tensor, chunk: int = 1024) -> dict:
    """The part of the paired error that every sample shares.

    With e_i = (sample_i - fp_i) / 255 and m = mean_i e_i (one image), the paired MSE splits
    exactly into mean(m^2) (a shift common to all samples: a colour cast, a brightness or
    low-frequency offset) plus the spread of e_i around m. A distribution distance such as FID
    counts the common shift fully, while per-sample noise of the same MSE moves it much less.
    Returns ``mse`` = mean(m^2), ``fraction`` of the paired MSE, and ``channel_shift`` (the mean
    of e per channel, signed)."""
    total = None
    square = 0.0
    n = samples.shape[0]
    for e in _errors(samples, fp, chunk):
        total = e.sum(0) if total is None else total + e.sum(0)
        square += float(e.square().sum())
    m = total / n
    paired = square / (n * m.numel())
    mse = float(m.square().mean())
    return {"mse": mse, "fraction": mse / paired if paired > 0 else 0.0,
            "channel_shift": [float(c) for c in m.flatten(1).mean(1)]}


def _high_pass(x: torch.Tensor) -> torch.Tensor:
    """x minus its 3x3 local mean (borders: mean over the pixels inside): fine-scale detail."""
    blur = torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    return x - blur


def frequency_split(samples: torch.Tensor, fp: torch.Tensor, chunk: int = 1024) -> dict:
    """Where the paired error lies in scale, and whether the samples gained or lost fine detail.

    ``hf_fraction``: the share of the paired squared error at the finest scale (the error minus
    its 3x3 local mean). A trajectory that ends in another image differs at every scale; the
    noise that quantization leaves in otherwise matching images is mostly fine-scale.
    ``hf_energy_ratio``: the samples' fine-scale energy over the FP samples' (> 1: noisier or
    sharper, < 1: smoother; None when the FP samples have none). FID reacts to such a change of
    texture in every sample far more than the paired MSE does."""
    err = err_hf = q_hf = fp_hf = 0.0
    # below one grey level in one pixel per million values: rounding of the local mean, no detail
    floor = 1e-6 * (1 / 255) ** 2 * samples[0].numel() * samples.shape[0]
    for a, b in _pairs(samples, fp, chunk):
        a, b = a / 255.0, b / 255.0
        e = a - b
        err += float(e.square().sum())
        err_hf += float(_high_pass(e).square().sum())
        q_hf += float(_high_pass(a).square().sum())
        fp_hf += float(_high_pass(b).square().sum())
    return {"hf_fraction": err_hf / err if err > floor else 0.0,
            "hf_energy_ratio": q_hf / fp_hf if fp_hf > floor else None}


def error_tail(per_mse: torch.Tensor) -> dict:
    """How the paired error is spread over samples: quantiles of the per-sample MSE and the
    share of the summed MSE that the worst 1% and 10% of samples hold (at least one sample each;
    1% and 10% when every sample has the same error)."""
    v = per_mse.to(torch.float64).flatten().sort(descending=True).values
    n, total = v.numel(), float(v.sum())
    q = torch.quantile(v, torch.tensor([0.5, 0.9, 0.99], dtype=torch.float64))

    def share(frac: float) -> float:
        k = max(1, math.ceil(frac * n))
        return float(v[:k].sum()) / total if total > 0 else k / n

    return {"p50": float(q[0]), "p90": float(q[1]), "p99": float(q[2]), "max": float(v[0]),
            "share_worst_1pct": share(0.01), "share_worst_10pct": share(0.10)}


def psnr_from_mse(mse: torch.Tensor, values_per_sample: int) -> torch.Tensor:
    """PSNR (peak 1) per sample; MSE 0 maps to the largest finite uint8 PSNR (see module doc)."""
    cap = 10 * math.log10(255.0 ** 2 * values_per_sample)
    psnr = 10 * torch.log10(1.0 / mse.clamp_min(1e-300))
    return torch.where(mse > 0, psnr, torch.full_like(psnr, cap))


def paired_difference(a: np.ndarray, b: np.ndarray, resamples: int = 2000,
                      seed: int = 0) -> tuple[float, float, float]:
    """Mean of a - b over samples with a 95% percentile-bootstrap interval (lo, hi)."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for start in range(0, resamples, 100):  # 100 resamples at a time: bounded memory
        k = min(100, resamples - start)
        means[start:start + k] = d[rng.integers(0, len(d), size=(k, len(d)))].mean(1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(d.mean()), float(lo), float(hi)
