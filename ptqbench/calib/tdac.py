"""EDA-DM's Temporal Distribution Alignment Calibration (TDAC) scores (Liu et al. 2024,
arXiv 2401.04585, Sec. 4.1 and the official ``scripts/calibration.py``).

For every sampler step i, with F_i the feature-site maps of a fixed set of K trajectories:

- density_i   = #{ j != i : mean((F_i - F_j)^2) <= radius }        (MSE over all K maps)
- diversity_i = sum_{j != i} sum_{samples, positions} (1 - cos(F_i, F_j))
  where the cosine is taken along the channel axis at every spatial position, as the official
  code's ``nn.CosineSimilarity(dim=1)`` on (K, C, H, W) maps does;
- both min-max normalised to [0, 1]; score_i = density_i + lam * diversity_i;
- step i receives round(score_i / sum(score) * N) samples, the rounding error fixed as the official
  code does (add one to the steps with most samples, or remove one from the last steps).

Pairwise quantities come from two Gram matrices in float64, so the cost is one (S x KD) matmul
instead of S^2 passes over the maps.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..errors import PtqbenchError


def _minmax(v: torch.Tensor) -> torch.Tensor:
    span = v.max() - v.min()
    if span <= 0:  # all equal: no step is denser / more diverse than another
        return torch.zeros_like(v)
    return (v - v.min()) / span


def pairwise_mse(features: torch.Tensor, device=None, chunk: int = 16) -> torch.Tensor:
    """(S, S) mean squared difference between the steps' feature maps (S, K, ...)."""
    S = features.shape[0]
    gram = torch.zeros(S, S, dtype=torch.float64, device=device)
    sq = torch.zeros(S, dtype=torch.float64, device=device)
    flat = features.reshape(S, -1)
    D = flat.shape[1]
    # Chunk over the flattened dimension so a memory-mapped store is streamed, not loaded.
    cols = max(1, (1 << 24) // max(S, 1))
    for start in range(0, D, cols):
        block = flat[:, start:start + cols].to(device=device, dtype=torch.float64)
        gram += block @ block.T
        sq += block.pow(2).sum(1)
    mse = (sq[:, None] + sq[None, :] - 2 * gram) / D
    return mse.clamp_min(0)


def pairwise_cosine_sum(features: torch.Tensor, device=None,
                        eps: float = 1e-6) -> tuple[torch.Tensor, int]:
    """((S, S) sum over samples and positions of the channel-wise cosine similarity,
    number of positions per sample map)."""
    S, K = features.shape[:2]
    gram = torch.zeros(S, S, dtype=torch.float64, device=device)
    positions = 1
    for k0 in range(0, K, 8):
        f = features[:, k0:k0 + 8].to(device=device, dtype=torch.float64)
        f = f.reshape(S, f.shape[1], f.shape[2], -1)  # (S, k, C, positions)
        n = f / f.norm(dim=2, keepdim=True).clamp_min(eps)
        flat = n.reshape(S, -1)
        gram += flat @ flat.T
        positions = f.shape[-1]
    return gram, positions


def tdac_scores(features: torch.Tensor, radius: float, lam: float, device=None) -> dict:
    """Density, diversity (both normalised) and score per step of features (S, K, C, ...)."""
    if features.dim() < 3:
        raise PtqbenchError("TDAC needs features of shape (steps, samples, channels, ...)")
    S, K = features.shape[:2]
    mse = pairwise_mse(features, device)
    off = ~torch.eye(S, dtype=torch.bool, device=mse.device)
    density = ((mse <= radius) & off).sum(1).to(torch.float64)
    cos_sum, positions = pairwise_cosine_sum(features, device)
    total_pairs = K * positions  # number of (sample, position) cosines per pair of steps
    diversity = ((total_pairs - cos_sum) * off).sum(1)
    d_n, v_n = _minmax(density), _minmax(diversity)
    score = d_n + lam * v_n
    upper = mse[off]
    return {
        "density": density.float().cpu(), "diversity": diversity.float().cpu(),
        "density_norm": d_n.float().cpu(), "diversity_norm": v_n.float().cpu(),
        "score": score.float().cpu(),
        # to choose a radius for a new model: where the pairwise MSEs lie
        "mse_quantiles": {q: float(upper.quantile(q)) for q in (0.1, 0.25, 0.5, 0.75, 0.9)}
        if upper.numel() else {},
    }


def allocate(score: torch.Tensor, total: int) -> torch.Tensor:
    """Samples per step, proportional to ``score``, summing exactly to ``total``."""
    score = score.double().clamp_min(0)
    if float(score.sum()) <= 0:
        score = torch.ones_like(score)
    prob = score / score.sum()
    counts = torch.round(prob * total).long()
    err = total - int(counts.sum())
    if err > 0:
        # EDA-DM: one more sample for the steps that already have the most
        order = torch.argsort(counts, descending=True, stable=True)
        for i in range(err):
            counts[order[i % len(order)]] += 1
    elif err < 0:
        # EDA-DM: take one from the last steps (least noisy) that still have samples
        i = len(counts) - 1
        while err < 0:
            if counts[i] > 0:
                counts[i] -= 1
                err += 1
            i = i - 1 if i > 0 else len(counts) - 1
    return counts


def steps_from_counts(counts: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    """One step index per sample, in random order (sample j then uses trajectory j)."""
    steps = torch.repeat_interleave(torch.arange(len(counts)), counts)
    return steps[torch.randperm(len(steps), generator=generator)]
