"""Resampling and interval helpers shared by the metrics.

All resampling uses a CPU ``torch.Generator`` seeded with a fixed seed, so intervals are
reproducible and identical on every device.
"""
from __future__ import annotations

from typing import Iterator

import torch

#: 97.5% quantile of the standard normal
Z975 = 1.959963984540054
# 97.5% quantiles of Student's t for 1..30 degrees of freedom
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t975(df: int) -> float:
    """97.5% quantile of Student's t with ``df`` degrees of freedom (table to 30, then
    1.96 + 2.5/df, within 0.002 of the exact value)."""
    if df < 1:
        raise ValueError("t quantile needs df >= 1")
    return _T975[df - 1] if df <= 30 else Z975 + 2.5 / df


def resample_counts(n: int, resamples: int, seed: int) -> Iterator[torch.Tensor]:
    """Multiplicities (n,) int64 of ``resamples`` bootstrap resamples of n items (CPU)."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(resamples):
        idx = torch.randint(0, n, (n,), generator=g)
        yield torch.bincount(idx, minlength=n)


def bootstrap_mean(values: torch.Tensor, resamples: int = 1000, seed: int = 0,
                   chunk: int = 64) -> tuple[float, list[float] | None]:
    """Mean of ``values`` (N,) and its 95% percentile-bootstrap interval (None if resamples < 2)."""
    v = values.detach().to(torch.float64).cpu().flatten()
    mean = float(v.mean())
    if resamples < 2 or v.numel() < 2:
        return mean, None
    g = torch.Generator().manual_seed(seed)
    means = []
    for start in range(0, resamples, chunk):
        b = min(chunk, resamples - start)
        idx = torch.randint(0, v.numel(), (b, v.numel()), generator=g)
        means.append(v[idx].mean(1))
    q = torch.quantile(torch.cat(means), torch.tensor([0.025, 0.975], dtype=torch.float64))
    return mean, [float(q[0]), float(q[1])]
