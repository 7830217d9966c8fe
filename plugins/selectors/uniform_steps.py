"""Q-Diffusion's time-step-aware calibration: ``steps`` evenly spaced sampler steps, the same
``per_step`` trajectories at each.

Defaults 20 x 256 are Q-Diffusion's CIFAR-10 setting (Li et al., ICCV 2023, Sec. 5.1 and its
``--cali_st 20 --cali_n 256``); with DDIM-100 that is every 5th step starting at the noisiest,
which is what Q-Diffusion's ``range(0, 100, 100 // 20)`` picks.
"""
from __future__ import annotations

import torch

from ptqbench import hookimpl
from ptqbench.calib.selection import (DEFAULT_VALIDATION_FRACTION, StepSelector, check_int,
                                      evenly_spaced_steps)


class UniformSteps(StepSelector):
    name = "uniform-steps"
    description = "Q-Diffusion: n evenly spaced sampler steps x m trajectories each (20 x 256)"

    def __init__(self, steps: int = 20, per_step: int = 256,
                 validation_fraction: float = DEFAULT_VALIDATION_FRACTION):
        super().__init__(validation_fraction=validation_fraction, steps=steps, per_step=per_step)
        self.steps = check_int("steps", steps)
        self.per_step = check_int("per_step", per_step)

    def calib_size(self, num_steps: int) -> int:
        return self.steps * self.per_step

    def calib_trajectories(self, num_steps: int) -> int:
        return self.per_step

    def validation_steps(self, num_steps: int) -> torch.Tensor:
        # Validate on the same timestep grid the method calibrates on.
        return evenly_spaced_steps(num_steps, self.steps)

    def choose(self, trajectories, generator):
        grid = evenly_spaced_steps(trajectories.num_steps, self.steps)
        steps = grid.repeat_interleave(self.per_step)
        samples = torch.arange(self.per_step, dtype=torch.long).repeat(self.steps)
        return steps, samples, {"grid": grid}


@hookimpl
def register_selectors(register):
    register(UniformSteps)
