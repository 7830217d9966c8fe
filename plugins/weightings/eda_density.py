"""Static per-sample weights proportional to the TDAC score of each sample's timestep.

Uses the per-step scores the ``tdac`` selector leaves in ``calib.meta["step_scores"]`` (density +
lam * diversity, EDA-DM); weights are normalised to mean 1 over the calibration set, so the
reconstruction loss keeps its scale. An ablation of ptqbench: EDA-DM itself uses the score to
allocate samples, not to weight them; weighting on top of the allocation emphasises
high-score steps twice.
"""
from __future__ import annotations

import torch

from ptqbench import Weighting, hookimpl
from ptqbench.errors import PtqbenchError


class EdaDensity(Weighting):
    name = "eda-density"
    description = "Static weights proportional to the TDAC score of each sample's step (mean 1)"
    #: whether prepare() needs the selector's validation set (the pipeline may skip it otherwise)
    needs_validation = False

    def __init__(self):
        super().__init__()
        self._w = None

    def prepare(self, calib, val, context) -> None:
        scores = calib.meta.get("step_scores")
        if scores is None:
            raise PtqbenchError("weighting 'eda-density' needs per-step scores in "
                                "calib.meta['step_scores'] (use the 'tdac' selector)")
        scores = torch.as_tensor(scores, dtype=torch.float32)
        w = scores[calib.step.long().cpu()].clamp_min(0)
        mean = w.mean()
        # all-zero scores (every step alike): nothing to prefer, fall back to uniform
        w = w / mean if float(mean) > 0 else torch.ones_like(w)
        device = context.device if context is not None else torch.device("cpu")
        self._w = w.to(device)

    def weights(self, idx):
        if self._w is None:
            raise PtqbenchError("eda-density: prepare() was not called")
        if self._w.device != idx.device:
            self._w = self._w.to(idx.device)  # once: later calls find it in place
        return self._w[idx]

    def state(self) -> dict:
        if self._w is None:
            return {"kind": "eda-density"}
        return {"kind": "eda-density", "weight_min": float(self._w.min()),
                "weight_max": float(self._w.max())}


@hookimpl
def register_weightings(register):
    register(EdaDensity)
