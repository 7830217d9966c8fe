"""Random calibration: each sample from its own trajectory at a uniformly random sampler step.

A control for the structured selectors; the 1024-sample default matches PTQ4DM's and EDA-DM's
CIFAR-10 calibration size (ptqbench choice, no paper defines this baseline).
"""
from __future__ import annotations

import torch

from ptqbench import hookimpl
from ptqbench.calib.selection import DEFAULT_VALIDATION_FRACTION, StepSelector, check_int


class RandomSteps(StepSelector):
    name = "random"
    description = "One x_t per trajectory at a uniformly random sampler step (1024 samples)"

    def __init__(self, num_samples: int = 1024,
                 validation_fraction: float = DEFAULT_VALIDATION_FRACTION):
        super().__init__(validation_fraction=validation_fraction, num_samples=num_samples)
        self.num_samples = check_int("num_samples", num_samples)

    def calib_size(self, num_steps: int) -> int:
        return self.num_samples

    def calib_trajectories(self, num_steps: int) -> int:
        return self.num_samples

    def choose(self, trajectories, generator):
        steps = torch.randint(trajectories.num_steps, (self.num_samples,), generator=generator)
        return steps, torch.arange(self.num_samples, dtype=torch.long), {}


@hookimpl
def register_selectors(register):
    register(RandomSteps)
