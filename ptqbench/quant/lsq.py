"""Activation quantizer with LSQ-style learnable step size, shared or one set per sampler step.

State is created at construction: ``scale`` (a parameter, learned by reconstruction) and
``zero_point`` (a buffer, fixed after range initialisation as in BRECQ/Q-Diffusion), both of
shape (num_steps,); num_steps == 1 means parameters shared across timesteps. The sampler step of
the current call comes from :func:`ptqbench.quant.context.sampler_step`.

Gradient w.r.t. the step size is LSQ's (Esser et al. 2020) through STE rounding; the optional
gradient scale 1/sqrt(numel * qmax) is LSQ's, off by default because BRECQ/Q-Diffusion train the
step with plain Adam.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from .context import current_step
from .quantizer import fake_quant, qrange


def grad_scale(x: torch.Tensor, g: float) -> torch.Tensor:
    """Value of x, gradient scaled by g."""
    return (x - x * g).detach() + x * g


class ActQuantizer(nn.Module):
    def __init__(self, bits: int, mode: str = "asymmetric", num_steps: int = 1,
                 device=None):
        super().__init__()
        self.bits, self.mode, self.num_steps = int(bits), mode, int(num_steps)
        self.qmin, self.qmax = qrange(self.bits, mode)
        self.scale = nn.Parameter(torch.ones(self.num_steps, device=device), requires_grad=False)
        self.register_buffer("zero_point", torch.zeros(self.num_steps, device=device))
        self.enabled = True  # False: pass-through (e.g. weight-only reconstruction phase)
        self.lsq_grad_scale = False
        self.observer = None  # set by calibrate_activation_ranges while collecting statistics

    def _params(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.num_steps == 1:
            return self.scale, self.zero_point
        step = current_step()
        if step is None:
            return self.scale[:1], self.zero_point[:1]
        if isinstance(step, int):
            if not 0 <= step < self.num_steps:
                raise IndexError(f"sampler step {step} outside the {self.num_steps} per-step "
                                 f"activation parameter sets")
            return self.scale[step:step + 1], self.zero_point[step:step + 1]
        step = step.to(self.scale.device)
        if step.shape[0] != x.shape[0]:
            raise ValueError(f"sampler_step has {step.shape[0]} entries but the activation batch "
                             f"has {x.shape[0]} samples")
        view = (-1,) + (1,) * (x.dim() - 1)
        return self.scale[step].view(view), self.zero_point[step].view(view)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer is not None:
            self.observer.update(x, current_step())
            return x
        if not self.enabled:
            return x
        scale, zp = self._params(x)
        if self.lsq_grad_scale and scale.requires_grad:
            scale = grad_scale(scale, 1.0 / math.sqrt(x[0].numel() * self.qmax))
        return fake_quant(x, scale, zp, self.qmin, self.qmax)

    @torch.no_grad()
    def set_range(self, scale: torch.Tensor, zero_point: torch.Tensor,
                  step: Optional[int] = None) -> None:
        if step is None:
            self.scale.copy_(scale.reshape(-1).expand(self.num_steps))
            self.zero_point.copy_(zero_point.reshape(-1).expand(self.num_steps))
        else:
            self.scale[step] = scale.reshape(())
            self.zero_point[step] = zero_point.reshape(())

    def extra_repr(self) -> str:
        return f"bits={self.bits}, mode={self.mode}, num_steps={self.num_steps}"
