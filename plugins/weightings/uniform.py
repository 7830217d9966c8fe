"""Uniform sample weights: every calibration sample counts the same (Q-Diffusion, PTQ4DM,
EDA-DM). ``weights`` returns None, so the reconstruction loop takes a plain mean at no cost."""
from __future__ import annotations

from ptqbench import Weighting, hookimpl


class Uniform(Weighting):
    name = "uniform"
    description = "Every calibration sample has weight 1 (plain mean of the loss; no cost)"
    #: whether prepare() needs the selector's validation set (the pipeline may skip it otherwise)
    needs_validation = False

    def __init__(self):
        super().__init__()

    def weights(self, idx):
        return None

    def state(self) -> dict:
        return {"kind": "uniform"}


@hookimpl
def register_weightings(register):
    register(Uniform)
