"""KID, precision/recall and Inception Score on Inception features, with their intervals.

KID: torch-fidelity's own ``kid_features_to_metric`` (polynomial kernel of degree 3, unbiased
MMD^2, ``subsets`` random subsets of ``subset_size`` samples of each set, fixed seed), so values
equal torch-fidelity's. Interval: the subset estimates have standard deviation s (each uses m =
subset_size samples per side). When the distributions differ, the variance of an MMD^2 estimate
from m samples is O(1/m), so the mean over subsets, which approaches the estimate that uses all
N = min(N_gen, N_ref) samples, has standard error about s * sqrt(m / N), plus the Monte-Carlo
error of averaging only ``subsets`` subsets, s / sqrt(subsets). The interval is
mean +- 1.96 * s * sqrt(m / N + 1 / subsets). (With m = N every subset is the full set and s = 0,
so the default subset size is capped at N // 2.)

Precision/recall (Kynkäänniemi et al. 2019, torch-fidelity's definition, on Inception-2048
features, not VGG16): a generated sample is "precise" if it lies inside the k-NN ball (radius =
distance to its k-th nearest neighbour) of some reference sample; a reference sample is
"recalled" if it lies inside the k-NN ball of some generated sample. Computed here in chunks on
the features' device (torch-fidelity moves every distance matrix to the CPU, which is slow for
50k x 50k); the tests check equality with ``torch_fidelity.metric_prc``. No interval: the
per-sample indicators are not independent (the balls depend on all samples).

Inception Score: torch-fidelity's ``isc_features_to_metric`` on ``logits_unbiased`` (10 splits,
shuffled with a fixed seed). Interval: mean over splits +- t(0.975, splits - 1) * standard error
of the split scores.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .bootstrap import Z975, t975


def kid(gen: torch.Tensor, ref: torch.Tensor, subsets: int = 100, subset_size: int = 1000,
        seed: int = 2020) -> dict:
    """KID (mean over subsets) of generated vs reference pool features, with interval."""
    from torch_fidelity.metric_kid import (KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD,
                                           kid_features_to_metric)

    n = min(gen.shape[0], ref.shape[0])
    m = subset_size if subset_size < n else max(2, n // 2)
    out = kid_features_to_metric(gen.detach().float().cpu(), ref.detach().float().cpu(),
                                 kid_subsets=subsets, kid_subset_size=m, rng_seed=seed, verbose=False)
    mean, std = float(out[KEY_METRIC_KID_MEAN]), float(out[KEY_METRIC_KID_STD])
    half = Z975 * std * math.sqrt(m / n + 1 / subsets)
    return {"value": mean, "ci": [mean - half, mean + half], "subset_std": std,
            "subsets": subsets, "subset_size": m, "higher_is_better": False,
            "ci_method": "subset std scaled to the full sample: mean +- 1.96 s sqrt(m/N + 1/subsets)"}


def _knn_radii(x: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    """Distance of every row of x to its k-th nearest other row (the (k+1)-th including itself)."""
    return torch.cat([torch.cdist(x[i:i + chunk], x).kthvalue(k + 1, dim=1).values
                      for i in range(0, x.shape[0], chunk)])


def _covered(q: torch.Tensor, x: torch.Tensor, radii: torch.Tensor, chunk: int) -> torch.Tensor:
    """For every row of q: is it inside the ball of some row of x (radius ``radii``)?"""
    return torch.cat([(torch.cdist(q[i:i + chunk], x) <= radii[None, :]).any(dim=1)
                      for i in range(0, q.shape[0], chunk)])


def precision_recall(gen: torch.Tensor, ref: torch.Tensor, k: int = 3,
                     chunk: int = 4096) -> tuple[float, float]:
    """(precision, recall) of generated vs reference features (k-NN manifolds, k = ``k``)."""
    if min(gen.shape[0], ref.shape[0]) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} samples per set")
    gen = gen.detach().float()
    ref = ref.detach().float().to(gen.device)
    precision = _covered(gen, ref, _knn_radii(ref, k, chunk), chunk).double().mean()
    recall = _covered(ref, gen, _knn_radii(gen, k, chunk), chunk).double().mean()
    return float(precision), float(recall)


def inception_score(logits: torch.Tensor, splits: int = 10, seed: int = 2020) -> dict:
    """Inception Score (mean over splits) of ``logits_unbiased`` (N, 1008), with interval."""
    from torch_fidelity.metric_isc import (KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD,
                                           isc_features_to_metric)

    out = isc_features_to_metric(logits.detach().float().cpu(), splits=splits, shuffle=True,
                                 rng_seed=seed)
    mean, std = float(out[KEY_METRIC_ISC_MEAN]), float(out[KEY_METRIC_ISC_STD])
    if not np.isfinite(mean):
        raise ValueError("Inception Score is not finite (non-finite logits)")
    res = {"value": mean, "split_std": std, "splits": splits, "higher_is_better": True}
    if splits >= 2:
        half = t975(splits - 1) * std / math.sqrt(splits - 1)  # np.std has ddof 0
        res["ci"] = [mean - half, mean + half]
        res["ci_method"] = f"mean over {splits} splits +- t * standard error"
    return res
