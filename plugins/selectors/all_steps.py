"""Every sampler step, the same ``per_step`` trajectories at each.

The "all timesteps" end of Q-Diffusion's calibration ablation. ``per_step`` = 64 keeps a 100-step
sampler at 6400 samples, close to Q-Diffusion's 5120 budget (ptqbench choice).
"""
from __future__ import annotations

import torch

from ptqbench import hookimpl
from ptqbench.calib.selection import DEFAULT_VALIDATION_FRACTION, StepSelector, check_int


class AllSteps(StepSelector):
    name = "all-steps"
    description = "Every sampler step x the same m trajectories (m = 64)"

    def __init__(self, per_step: int = 64,
                 validation_fraction: float = DEFAULT_VALIDATION_FRACTION):
        super().__init__(validation_fraction=validation_fraction, per_step=per_step)
        self.per_step = check_int("per_step", per_step)

    def calib_size(self, num_steps: int) -> int:
        return num_steps * self.per_step

    def calib_trajectories(self, num_steps: int) -> int:
        return self.per_step

    def choose(self, trajectories, generator):
        S = trajectories.num_steps
        steps = torch.arange(S, dtype=torch.long).repeat_interleave(self.per_step)
        samples = torch.arange(self.per_step, dtype=torch.long).repeat(S)
        return steps, samples, {}


@hookimpl
def register_selectors(register):
    register(AllSteps)
