"""Fréchet distance (FID, sFID, FID-to-FP) and its bootstrap.

FID = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr sqrt(S1 S2), with mu and the unbiased covariance S
(ddof = 1) of each feature set in float64, as in torch-fidelity (TTUR's formula).

The hard term is tr sqrt(S1 S2). torch-fidelity takes the square roots of the eigenvalues of the
non-symmetric product S1 @ S2 (``np.linalg.eigvals``, a general eigensolver: about 3 s for
2048 x 2048 on a CPU, much more on a loaded one, and noisy in the null space when N < d). Here it
is computed from factors instead: with S1 = P^T P and S2 = Q^T Q, the nonzero eigenvalues of S1 S2
are the squared singular values of P Q^T, so tr sqrt(S1 S2) = ||P Q^T||_* = the sum of the square
roots of the eigenvalues of a symmetric Gram matrix whose size is the smaller of the factors' row
counts, never more than the feature dimension d. A feature set's factor is its centred features
/ sqrt(N - 1) (N x d) when the raw features are at hand, else diag(sqrt(w)) V^T from the eigh of
its covariance (d x d). This is exact, runs in float64 on the features' device (one symmetric
eigensolve of at most d x d), and agrees with torch-fidelity's value to its eigensolver's rounding
(the tests check < 1e-6 relative against ``torch_fidelity.calculate_metrics``);
``frechet_distance_torch_fidelity`` gives torch-fidelity's own computation for comparison.

Bootstrap: the generated samples are resampled with replacement (``resamples`` times, fixed
seed) and the reference stays fixed (it is the same for every cell), or, for FID-to-FP, both sets
are resampled with the same indices (the samples are paired by seed). Resampling is expressed as
multiplicities, so each replicate is one weighted factor and one Gram eigensolve. The interval is
the normal bootstrap interval centred on the point estimate, value +- 1.96 * sd(replicates): FID is
biased upwards at small N and resamples (with duplicates) behave like smaller sets, so
percentile intervals would be shifted upwards and could exclude the point estimate, while the
spread of the replicates remains a fair estimate of the sampling variability.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from .bootstrap import Z975, resample_counts


@dataclass
class FeatureStats:
    """mean (float64, (d,)) and covariance (float64, (d, d)) of n feature vectors."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int

    def to_tensors(self) -> dict:
        return {"mu": torch.from_numpy(self.mu), "sigma": torch.from_numpy(self.sigma), "n": self.n}

    @classmethod
    def from_tensors(cls, d: dict) -> "FeatureStats":
        return cls(d["mu"].numpy(), d["sigma"].numpy(), int(d["n"]))


def statistics(features: torch.Tensor) -> FeatureStats:
    """Mean and unbiased covariance (float64, computed on the features' device) of (N, d) features."""
    if features.dim() != 2 or features.shape[0] < 2:
        raise ValueError(f"FID statistics need (N >= 2, d) features, got {tuple(features.shape)}")
    mu, factor = weighted_factor(features.detach().to(torch.float64))
    return FeatureStats(mu.cpu().numpy(), (factor.T @ factor).cpu().numpy(), features.shape[0])


def frechet_distance_torch_fidelity(a: FeatureStats, b: FeatureStats) -> float:
    """torch-fidelity's own Fréchet distance (general eigensolver on S1 @ S2), for comparison."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    out = fid_statistics_to_metric({"mu": a.mu, "sigma": a.sigma}, {"mu": b.mu, "sigma": b.sigma},
                                   verbose=False)
    return float(out[KEY_METRIC_FID])


# ---- factored form ---------------------------------------------------------------------------
@dataclass
class Gaussian:
    """A feature distribution as mean, covariance factor (factor^T factor = covariance) and trace."""

    mu: torch.Tensor  # (d,) float64
    factor: torch.Tensor  # (r, d) float64
    trace: torch.Tensor  # () float64
    n: int

    @classmethod
    def from_features(cls, x: torch.Tensor, counts: Optional[torch.Tensor] = None) -> "Gaussian":
        """From (N, d) features, each row counted ``counts[i]`` times (default once)."""
        mu, factor = weighted_factor(x.detach().to(torch.float64), counts)
        n = x.shape[0] if counts is None else int(counts.sum())
        return cls(mu, factor, (factor * factor).sum(), n)

    @classmethod
    def from_stats(cls, stats: FeatureStats, device: torch.device | str = "cpu") -> "Gaussian":
        sigma = torch.from_numpy(stats.sigma).to(device, torch.float64)
        return cls(torch.from_numpy(stats.mu).to(device, torch.float64), compact_factor(sigma),
                   torch.trace(sigma), stats.n)

    def to(self, device) -> "Gaussian":
        return Gaussian(self.mu.to(device), self.factor.to(device), self.trace.to(device), self.n)

    def compact(self) -> "Gaussian":
        """The same Gaussian with a (d, d) factor (one eigh) if its factor has more rows than d."""
        f = self.factor
        if f.shape[0] <= f.shape[1]:
            return self
        return Gaussian(self.mu, compact_factor(f.T @ f), self.trace, self.n)


def weighted_factor(x: torch.Tensor, counts: Optional[torch.Tensor] = None):
    """Mean and covariance factor of (N, d) float64 features x with per-row multiplicities.

    Returns (mu, F) with F^T F equal to the unbiased covariance of the multiset (ddof = 1).
    """
    w = torch.ones(x.shape[0], dtype=x.dtype, device=x.device) if counts is None else counts.to(x)
    total = w.sum()
    mu = (w[:, None] * x).sum(0) / total
    factor = (w / (total - 1)).sqrt()[:, None] * (x - mu)
    return mu, factor


def compact_factor(sigma: torch.Tensor) -> torch.Tensor:
    """A (d, d) factor P of a PSD matrix with P^T P = sigma (from its eigendecomposition)."""
    w, v = torch.linalg.eigh((sigma + sigma.T) / 2)
    return w.clamp_min(0).sqrt()[:, None] * v.T


def trace_sqrt_product(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """tr sqrt(A B) for PSD A = p^T p, B = q^T q; p: (a, d), q: (b, d). (The nuclear norm of p q^T.)"""
    d = p.shape[1]
    if p.shape[0] > q.shape[0]:
        p, q = q, p  # tr sqrt(AB) = tr sqrt(BA): let p be the factor with fewer rows
    if p.shape[0] > d:
        p = compact_factor(p.T @ p)  # both factors are tall: work in d dimensions
    if q.shape[0] > d:
        gram = p @ (q.T @ q) @ p.T  # (a, a) through the (d, d) covariance of q
    else:
        k = p @ q.T  # (a, b), a <= b <= d
        gram = k @ k.T
    ev = torch.linalg.eigvalsh((gram + gram.T) / 2)
    return ev.clamp_min(0).sqrt().sum()


def frechet_distance(a: Gaussian, b: Gaussian) -> float:
    """Fréchet distance between two Gaussians (computed on ``a``'s device, float64)."""
    b = b.to(a.mu.device)
    diff = a.mu - b.mu
    return float(diff @ diff + a.trace + b.trace - 2 * trace_sqrt_product(a.factor, b.factor))


def bootstrap_fid(features: torch.Tensor, reference: Gaussian | torch.Tensor,
                  resamples: int, seed: int) -> list[float]:
    """FID of ``resamples`` bootstrap resamples of ``features`` (N, d).

    ``reference`` is either a fixed Gaussian (only the samples are resampled) or a second (N, d)
    feature tensor paired row by row with ``features`` (both resampled with the same indices).
    Runs on ``features``' device in float64.
    """
    x = features.detach().to(torch.float64)
    paired = torch.is_tensor(reference)
    if paired:
        y = reference.detach().to(x.device, torch.float64)
        if y.shape != x.shape:
            raise ValueError(f"paired bootstrap needs equal shapes, got {tuple(x.shape)} and "
                             f"{tuple(y.shape)}")
    else:
        ref = reference.to(x.device).compact()  # a tall factor would cost a Gram per replicate
    out = []
    for counts in resample_counts(x.shape[0], resamples, seed):
        counts = counts.to(x.device)
        other = Gaussian.from_features(y, counts) if paired else ref
        out.append(frechet_distance(Gaussian.from_features(x, counts), other))
    return out


def fid_value(value: float, replicates: list[float], method: str) -> dict:
    """The value dict entries for a Fréchet distance with its normal bootstrap interval."""
    out = {"value": value, "higher_is_better": False}
    if len(replicates) >= 2:
        sd = float(np.std(replicates, ddof=1))
        out["ci"] = [value - Z975 * sd, value + Z975 * sd]
        out["ci_method"] = f"{method}: normal bootstrap, {len(replicates)} resamples"
    return out
