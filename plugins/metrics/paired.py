"""The ``paired`` metric: per-sample MSE and PSNR against the FP samples with the same seeds.

Images are scaled to [0, 1] (uint8 / 255). For sample i, MSE_i is the mean squared difference over
all channels and pixels, and PSNR_i = 10 log10(1 / MSE_i) (peak 1). A sample identical to its FP
counterpart has MSE_i = 0; its PSNR is set to 10 log10(255^2 * C * H * W), the PSNR of one grey
level of difference in one pixel, i.e. the largest finite PSNR between two uint8 images of that
size (the count of such samples is reported as ``identical``). Both outputs are means over
samples with a 95% percentile-bootstrap interval (``bootstrap`` resamples, fixed ``seed``).
``paired_mse`` also carries ``systematic``: the part of the MSE that is a shift common to every
sample (the mean error image's MSE, its fraction of the paired MSE, and the mean error per
channel; :func:`ptqbench.metrics.paired.systematic_error`). FID weighs such a shift fully, so a
method can have lower paired MSE and higher FID-to-FP than another when more of its error is
systematic (issue 11's open question at W8A8). ``paired_mse.tail`` says how the error spreads
over samples: quantiles of MSE_i and the share of the summed MSE held by the worst 1% and 10% of
samples (a few trajectories that end in another image move FID-to-FP far more than a small error
spread over all samples). ``paired_mse.detail`` says at which scale the error lies (the share
at the finest scale) and whether the samples gained or lost fine detail against the FP samples
(:func:`ptqbench.metrics.paired.frequency_split`).

On the reference (FP) cell the samples are the FP samples: ``paired_mse`` is 0 and
``paired_psnr`` is unavailable.

Options: bootstrap (default 1000; 0 = no interval), seed (default 0), chunk (samples per step of
the computation, default 1024).
"""
from __future__ import annotations

from typing import Any

import torch

from ptqbench import Metric, MetricContext, hookimpl
from ptqbench.errors import PtqbenchError
from ptqbench.metrics.bootstrap import bootstrap_mean
from ptqbench.metrics.paired import (error_tail, frequency_split, per_sample_mse, psnr_from_mse,
                                     systematic_error)

_SPEC = {"bootstrap": (1000, 0), "seed": (0, 0), "chunk": (1024, 1)}


class Paired(Metric):
    name = "paired"
    description = "per-sample MSE and PSNR against the FP samples with the same seeds"
    needs_fp_samples = True

    def __init__(self, **options: Any):
        super().__init__(**options)
        unknown = sorted(set(options) - set(_SPEC))
        if unknown:
            raise PtqbenchError(f"metric 'paired': unknown option(s) {unknown}; known: {sorted(_SPEC)}")
        self.cfg = {}
        for key, (default, minimum) in _SPEC.items():
            value = options.get(key, default)
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise PtqbenchError(f"metric 'paired': option {key!r} must be an integer >= {minimum}, "
                                    f"got {value!r}")
            self.cfg[key] = value

    def compute(self, samples: torch.Tensor, context: MetricContext) -> dict[str, dict]:
        n = int(samples.shape[0])
        mse = {"n": n, "higher_is_better": False}
        psnr = {"n": n, "higher_is_better": True}
        if context.is_reference_cell:
            mse.update(value=0.0, ci=[0.0, 0.0])
            psnr.update(value=None, unavailable="reference cell: the samples are the FP samples")
            return {"paired_mse": mse, "paired_psnr": psnr}
        fp = context.fp_samples
        if fp is None:
            reason = "no FP samples with the same seeds (the FP cell has none)"
            mse.update(value=None, unavailable=reason)
            psnr.update(value=None, unavailable=reason)
            return {"paired_mse": mse, "paired_psnr": psnr}
        for what, t in (("samples", samples), ("FP samples", fp)):
            if not torch.is_tensor(t) or t.dtype != torch.uint8 or t.dim() != 4:
                raise PtqbenchError(f"metric 'paired': {what} must be a uint8 (N, C, H, W) tensor")
        if tuple(fp.shape) != tuple(samples.shape):
            raise PtqbenchError(f"metric 'paired': samples {tuple(samples.shape)} and FP samples "
                                f"{tuple(fp.shape)} differ in shape; they must share seeds")
        per_mse = per_sample_mse(samples, fp, self.cfg["chunk"])
        per_psnr = psnr_from_mse(per_mse, samples[0].numel())
        boot, seed = self.cfg["bootstrap"], self.cfg["seed"]
        for out, values in ((mse, per_mse), (psnr, per_psnr)):
            value, ci = bootstrap_mean(values, boot, seed)
            out["value"] = value
            if ci is not None:
                out["ci"] = ci
                out["ci_method"] = f"percentile bootstrap of the mean, {boot} resamples, seed {seed}"
        psnr["identical"] = int((per_mse == 0).sum())
        mse["systematic"] = systematic_error(samples, fp, self.cfg["chunk"])
        mse["tail"] = error_tail(per_mse)
        mse["detail"] = frequency_split(samples, fp, self.cfg["chunk"])
        return {"paired_mse": mse, "paired_psnr": psnr}

    def identity(self) -> dict:
        return {"implementation": "ptqbench_plugins.metrics.paired", "scale": "[0, 1]",
                "psnr_peak": 1.0, "options": dict(self.cfg)}


@hookimpl
def register_metrics(register):
    register(Paired)
