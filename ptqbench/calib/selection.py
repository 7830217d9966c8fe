"""What every step selector shares: option checks, trajectory budgeting and the validation set.

A selector picks (sampler step, trajectory) pairs from the FP trajectory store. Calibration pairs
use trajectories ``0 .. calib_trajectories-1``; the validation set uses the *next*
``val_per_step`` trajectories (different x_T, so validation never sees a calibration sample),
the same ones at every validation step, so it has an equal number of samples per timestep.
Because validation trajectories come after the calibration ones, the calibration set is the same
whatever ``validation_fraction`` is: methods with and without a validation set (qdiffusion vs
gac) calibrate on identical data.
"""
from __future__ import annotations

from abc import abstractmethod
from typing import Optional

import torch

from ..errors import PtqbenchError
from ..interfaces import CalibSet, RunContext, Selector, Trajectories

#: GAC (Hoang et al., ICLR 2026) ablates 2/5/10/20 % and finds 5 % best on CIFAR-10
DEFAULT_VALIDATION_FRACTION = 0.05


def check_int(name: str, value, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise PtqbenchError(f"option {name!r} must be an integer >= {low}, got {value!r}")
    return value


def check_float(name: str, value, low: float, high: float, low_open: bool = False,
                high_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PtqbenchError(f"option {name!r} must be a number, got {value!r}")
    v = float(value)
    bad_low = v <= low if low_open else v < low
    bad_high = v >= high if high_open else v > high
    if bad_low or bad_high:
        lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
        raise PtqbenchError(f"option {name!r} must be in {lo}{low}, {high}{hi}, got {value!r}")
    return v


def evenly_spaced_steps(num_steps: int, n: int) -> torch.Tensor:
    """``n`` step indices floor(k * S / n), k < n: Q-Diffusion's ``range(0, S, S // n)`` when
    ``n`` divides ``S`` (starts at the noisiest step), and still exactly ``n`` steps otherwise."""
    if n > num_steps:
        raise PtqbenchError(f"cannot pick {n} distinct steps from a {num_steps}-step sampler")
    return (torch.arange(n, dtype=torch.long) * num_steps) // n


def step_counts(steps: torch.Tensor, num_steps: int) -> torch.Tensor:
    return torch.bincount(steps.long(), minlength=num_steps)


class StepSelector(Selector):
    """Base class: subclasses say how many calibration trajectories they need and which
    (step, trajectory) pairs they take; this class adds checks, metadata and validation."""

    #: whether the trajectory store must hold feature-site outputs (TDAC)
    needs_features: bool = False

    def __init__(self, validation_fraction: float = DEFAULT_VALIDATION_FRACTION, **options):
        super().__init__(validation_fraction=validation_fraction, **options)
        self.validation_fraction = check_float("validation_fraction", validation_fraction,
                                               0.0, 1.0, high_open=True)

    # ---- what subclasses provide ----------------------------------------------------------
    @abstractmethod
    def calib_size(self, num_steps: int) -> int:
        """Number of calibration samples."""

    @abstractmethod
    def calib_trajectories(self, num_steps: int) -> int:
        """Number of trajectories the calibration pairs are drawn from."""

    @abstractmethod
    def choose(self, trajectories: Trajectories, generator: torch.Generator
               ) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """(steps, trajectory indices, meta) of the calibration set."""

    def validation_steps(self, num_steps: int) -> torch.Tensor:
        """Steps the validation set covers: every sampler step unless the method fixes a grid."""
        return torch.arange(num_steps, dtype=torch.long)

    # ---- budgeting ------------------------------------------------------------------------
    def val_per_step(self, num_steps: int) -> int:
        """Validation samples per step: the fraction of the calibration size spread evenly over
        the validation steps, rounded, at least one (a timestep group needs a sample)."""
        if self.validation_fraction == 0:
            return 0
        n_val_steps = len(self.validation_steps(num_steps))
        return max(1, round(self.validation_fraction * self.calib_size(num_steps) / n_val_steps))

    def num_trajectories(self, num_steps: int) -> int:
        """How many FP trajectories the pipeline must record for a ``num_steps``-step sampler."""
        return self.calib_trajectories(num_steps) + self.val_per_step(num_steps)

    def trajectory_options(self, num_steps: int) -> dict:
        """Keyword arguments for :func:`ptqbench.calib.trajectories.get_trajectories`."""
        return {"num_samples": self.num_trajectories(num_steps),
                "with_features": self.needs_features}

    # ---- selection ------------------------------------------------------------------------
    def select(self, trajectories: Trajectories, generator: torch.Generator,
               context: Optional[RunContext] = None) -> tuple[CalibSet, Optional[CalibSet]]:
        S = trajectories.num_steps
        need = self.num_trajectories(S)
        if trajectories.num_samples < need:
            raise PtqbenchError(f"selector {self.name!r} needs {need} trajectories, the store "
                                f"has {trajectories.num_samples}")
        steps, samples, meta = self.choose(trajectories, generator)
        calib = trajectories.gather(steps, samples)
        calib.meta.update(meta)
        calib.meta.setdefault("selector", self.name)
        calib.meta["step_counts"] = step_counts(steps, S)
        calib.meta["timesteps"] = trajectories.t.clone()
        return calib, self.validation(trajectories)

    def validation(self, trajectories: Trajectories) -> Optional[CalibSet]:
        S = trajectories.num_steps
        v = self.val_per_step(S)
        if v == 0:
            return None
        vsteps = self.validation_steps(S)
        first = self.calib_trajectories(S)
        steps = vsteps.repeat_interleave(v)
        samples = torch.arange(first, first + v, dtype=torch.long).repeat(len(vsteps))
        val = trajectories.gather(steps, samples)
        val.meta.update({"selector": self.name, "role": "validation", "per_step": v,
                         "timesteps": trajectories.t.clone()})
        return val
