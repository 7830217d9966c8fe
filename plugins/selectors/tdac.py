"""EDA-DM's Temporal Distribution Alignment Calibration (Liu et al. 2024, arXiv 2401.04585).

Steps are scored by the density and diversity of their feature-site maps
(:mod:`ptqbench.calib.tdac`), samples are allocated to steps in proportion to the score, and each
sample comes from its own trajectory. Defaults are EDA-DM's CIFAR-10 setting
(``scripts/for_cifar.sh``: ``--calib_num_samples 1024 --lamda 1.2``, radius 3.0 in
``TDAC_cifar_calib_data_generator``); LSUN uses radius 0.3 and lam 1.0. The radius is an absolute
MSE between feature maps, so it is model specific: ``calib.meta["tdac"]["mse_quantiles"]`` shows
where a model's pairwise MSEs lie.
"""
from __future__ import annotations

from typing import Optional

import torch

from ptqbench import hookimpl
from ptqbench.calib.selection import (DEFAULT_VALIDATION_FRACTION, StepSelector, check_float,
                                      check_int)
from ptqbench.calib.tdac import allocate, steps_from_counts, tdac_scores
from ptqbench.calib.trajectories import DEFAULT_FEATURE_SAMPLES
from ptqbench.errors import PtqbenchError


class TDAC(StepSelector):
    name = "tdac"
    description = "EDA-DM: samples per step ~ density + lam * diversity of mid-block features"
    needs_features = True

    def __init__(self, num_samples: int = 1024, radius: float = 3.0, lam: float = 1.2,
                 feature_samples: int = DEFAULT_FEATURE_SAMPLES,
                 feature_site: Optional[str] = None,
                 validation_fraction: float = DEFAULT_VALIDATION_FRACTION):
        super().__init__(validation_fraction=validation_fraction, num_samples=num_samples,
                         radius=radius, lam=lam, feature_samples=feature_samples,
                         feature_site=feature_site)
        self.num_samples = check_int("num_samples", num_samples)
        self.radius = check_float("radius", radius, 0.0, float("inf"))
        self.lam = check_float("lam", lam, 0.0, float("inf"))
        self.feature_samples = check_int("feature_samples", feature_samples)
        if feature_site is not None and not isinstance(feature_site, str):
            raise PtqbenchError(f"option 'feature_site' must be a module path, got {feature_site!r}")
        self.feature_site = feature_site

    def calib_size(self, num_steps: int) -> int:
        return self.num_samples

    def calib_trajectories(self, num_steps: int) -> int:
        return self.num_samples

    def trajectory_options(self, num_steps: int) -> dict:
        opts = super().trajectory_options(num_steps)
        opts.update(feature_samples=self.feature_samples, feature_module=self.feature_site)
        return opts

    def choose(self, trajectories, generator):
        if trajectories.features is None:
            raise PtqbenchError("selector 'tdac' needs trajectories recorded with features "
                                "(get_trajectories(..., with_features=True))")
        scores = tdac_scores(trajectories.features, self.radius, self.lam)
        counts = allocate(scores["score"], self.num_samples)
        steps = steps_from_counts(counts, generator)
        samples = torch.arange(self.num_samples, dtype=torch.long)
        meta = {"step_scores": scores["score"],
                "tdac": {k: v for k, v in scores.items() if k != "score"}}
        return steps, samples, meta


@hookimpl
def register_selectors(register):
    register(TDAC)
