"""AdaRound (Nagel et al. 2020) as used by BRECQ / Q-Diffusion.

A weight w with scale s rounds to floor(w/s) + h(alpha), h the rectified sigmoid
h = clamp(sigmoid(alpha) * (zeta - gamma) + gamma, 0, 1), zeta = 1.1, gamma = -0.1.
The regulariser sum(1 - |2h - 1|^beta) pushes h to {0, 1}; beta is annealed from 20 to 2 after a
warm-up during which the regulariser is off. Hardening takes h = [alpha >= 0].
"""
from __future__ import annotations

import torch

ZETA, GAMMA = 1.1, -0.1


def rectified_sigmoid(alpha: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(alpha) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def hard_rounding(alpha: torch.Tensor) -> torch.Tensor:
    return (alpha >= 0).to(alpha.dtype)


def init_alpha(rest: torch.Tensor) -> torch.Tensor:
    """alpha with h(alpha) == rest (the fractional part w/s - floor(w/s)), so AdaRound starts
    at the original FP weight (BRECQ's initialisation)."""
    rest = rest.clamp(1e-6, 1 - 1e-6)  # keep the logit finite
    return -torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1)


def rounding_regularizer(alpha: torch.Tensor, beta) -> torch.Tensor:
    """sum(1 - |2 h(alpha) - 1|^beta); ``beta`` may be a tensor (no recompiles when it changes)."""
    h = rectified_sigmoid(alpha)
    return (1 - (2 * h - 1).abs().pow(beta)).sum()


class BetaSchedule:
    """BRECQ's LinearTempDecay + loss start: returns (beta, regulariser on?) for an iteration.

    During the first ``warmup`` fraction of ``iterations`` the regulariser is off; afterwards beta
    decays linearly from ``start`` to ``end`` over the remaining iterations.
    """

    def __init__(self, iterations: int, start: float = 20.0, end: float = 2.0,
                 warmup: float = 0.2):
        self.iterations, self.start, self.end = iterations, start, end
        self.start_decay = warmup * iterations

    def __call__(self, it: int) -> tuple[float, bool]:
        if it < self.start_decay:
            return self.start, False
        span = max(self.iterations - self.start_decay, 1e-12)
        rel = (it - self.start_decay) / span
        return self.end + (self.start - self.end) * max(0.0, 1.0 - rel), True
