"""PTQ4DM's Normally Distributed Time-step Calibration (Shang et al., CVPR 2023, Sec. 4.2).

Each calibration sample comes from its own trajectory, stopped at a timestep drawn from a normal
distribution over the sampler's steps: u ~ N(mean, std) (fractions of the step count, counted from
the clean end as in PTQ4DM's respaced-diffusion indices), t = int(u * S) clamped to [0, S-1].
Defaults follow PTQ4DM's ``--calib_t_mode normal --calib_t_mode_normal_mean 0.4
--calib_t_mode_normal_std 0.4`` and its 1024 calibration samples.
"""
from __future__ import annotations

import torch

from ptqbench import hookimpl
from ptqbench.calib.selection import (DEFAULT_VALIDATION_FRACTION, StepSelector, check_float,
                                      check_int)


class NormalSteps(StepSelector):
    name = "normal-steps"
    description = "PTQ4DM: one x_t per trajectory at t ~ N(0.4 T, 0.4 T), clamped (1024 samples)"

    def __init__(self, num_samples: int = 1024, mean: float = 0.4, std: float = 0.4,
                 validation_fraction: float = DEFAULT_VALIDATION_FRACTION):
        super().__init__(validation_fraction=validation_fraction, num_samples=num_samples,
                         mean=mean, std=std)
        self.num_samples = check_int("num_samples", num_samples)
        self.mean = check_float("mean", mean, 0.0, 1.0)
        self.std = check_float("std", std, 0.0, 10.0, low_open=True)

    def calib_size(self, num_steps: int) -> int:
        return self.num_samples

    def calib_trajectories(self, num_steps: int) -> int:
        return self.num_samples

    def choose(self, trajectories, generator):
        S = trajectories.num_steps
        u = torch.randn(self.num_samples, generator=generator, dtype=torch.float64)
        u = u * self.std + self.mean
        # PTQ4DM truncates toward zero, then clamps; index 0 is the clean end.
        t_index = (u * S).to(torch.long).clamp(0, S - 1)
        steps = (S - 1) - t_index  # our step 0 is the noisiest
        samples = torch.arange(self.num_samples, dtype=torch.long)
        return steps, samples, {}


@hookimpl
def register_selectors(register):
    register(NormalSteps)
