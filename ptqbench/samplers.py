"""Sampling loops beyond DDIM, and the factory that picks one for a sampler spec.

- ``ddim``: :class:`ptqbench.sampling.DDIMSampler`; a model that also predicts its variance
  (2C output channels, DiT-XL/2) has the variance half dropped.
- ``ddpm``: ancestral DDPM on a respaced grid (DiT's sampler: ``space_timesteps`` + ``p_sample``),
  with the variance the scheduler config names: ``learned_range`` (the model's second half of
  channels interpolates between the clipped posterior and beta, in log space), ``fixed_small``
  (posterior variance) or ``fixed_large`` (beta).
- ``pndm``: PLMS through diffusers' own ``PNDMScheduler`` (Stable Diffusion's default sampler).

Every loop draws x_T and its per-step noise from per-sample generators (see ptqbench.sampling),
so sample i is the same whatever the batch.
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch

from .errors import PtqbenchError
from .sampling import DDIMSampler, SamplerSpec, ddim_timesteps, draw, sample_generators

Denoise = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
OnStep = Optional[Callable[[int, torch.Tensor, torch.Tensor], None]]


def make_sampler(spec: SamplerSpec, scheduler_config: dict):
    if spec.kind == "ddim":
        return EpsDDIMSampler(spec, scheduler_config)
    if spec.kind == "ddpm":
        return DDPMSampler(spec, scheduler_config)
    if spec.kind == "pndm":
        return PNDMSampler(spec, scheduler_config)
    raise PtqbenchError(f"unknown sampler kind {spec.kind!r}")


def _first_channels(out: torch.Tensor, channels: int) -> torch.Tensor:
    return out[:, :channels] if out.shape[1] != channels else out


class EpsDDIMSampler(DDIMSampler):
    """DDIM that ignores a learned-variance half of the model output."""

    def run(self, denoise: Denoise, shape, indices, seed, device, on_step: OnStep = None):
        return super().run(lambda x, t, k: _first_channels(denoise(x, t, k), shape[0]),
                           shape, indices, seed, device, on_step)


class DDPMSampler:
    """Ancestral DDPM on the respaced grid of ``spec`` (eta is ignored: always stochastic)."""

    def __init__(self, spec: SamplerSpec, scheduler_config: dict):
        from diffusers import DDPMScheduler

        self.spec = spec
        sched = DDPMScheduler.from_config(scheduler_config)
        self.alphas_cumprod = sched.alphas_cumprod.double()
        self.variance_type = sched.config.variance_type
        if self.variance_type not in ("learned_range", "fixed_small", "fixed_large"):
            raise PtqbenchError(f"ddpm sampler: unsupported variance_type "
                                f"{self.variance_type!r} (learned_range, fixed_small, fixed_large)")
        self.clip_sample = bool(sched.config.clip_sample)
        self.prediction_type = sched.config.prediction_type
        if self.prediction_type != "epsilon":
            raise PtqbenchError("ddpm sampler supports epsilon prediction only")
        self.timesteps = torch.from_numpy(
            ddim_timesteps(spec.steps, sched.config.num_train_timesteps, spec.spacing))

    def _coefficients(self, k: int) -> dict:
        t = int(self.timesteps[k])
        t_prev = int(self.timesteps[k + 1]) if k + 1 < len(self.timesteps) else -1
        a_t = float(self.alphas_cumprod[t])
        a_prev = 1.0 if t_prev < 0 else float(self.alphas_cumprod[t_prev])
        beta = 1.0 - a_t / a_prev  # the respaced schedule's beta
        post_var = beta * (1.0 - a_prev) / (1.0 - a_t)
        return {"a_t": a_t, "a_prev": a_prev, "beta": beta, "post_var": post_var,
                "last": t_prev < 0}

    def step(self, model_out: torch.Tensor, k: int, x: torch.Tensor,
             noise: Optional[torch.Tensor]) -> torch.Tensor:
        c = self._coefficients(k)
        C = x.shape[1]
        eps = model_out[:, :C]
        x0 = (x - (1 - c["a_t"]) ** 0.5 * eps) / c["a_t"] ** 0.5
        if self.clip_sample:
            x0 = x0.clamp(-1, 1)
        mean = (c["a_prev"] ** 0.5 * c["beta"] / (1 - c["a_t"]) * x0
                + (1 - c["beta"]) ** 0.5 * (1 - c["a_prev"]) / (1 - c["a_t"]) * x)
        if c["last"] or noise is None:
            return mean
        if self.variance_type == "learned_range":
            if model_out.shape[1] != 2 * C:
                raise PtqbenchError("variance_type 'learned_range' needs a model that outputs "
                                    f"2 x {C} channels, got {model_out.shape[1]}")
            frac = (model_out[:, C:] + 1) / 2
            min_log = float(np.log(max(c["post_var"], 1e-20)))
            max_log = float(np.log(c["beta"]))
            log_var = frac * max_log + (1 - frac) * min_log
        else:
            var = c["post_var"] if self.variance_type == "fixed_small" else c["beta"]
            log_var = torch.full_like(x, float(np.log(max(var, 1e-20))))
        return mean + torch.exp(0.5 * log_var) * noise

    @torch.no_grad()
    def run(self, denoise: Denoise, shape, indices, seed, device, on_step: OnStep = None):
        gens = sample_generators(seed, indices)
        x = draw(gens, shape).to(device)
        S = len(self.timesteps)
        for k, t in enumerate(self.timesteps.tolist()):
            t_vec = torch.full((x.shape[0],), t, device=device, dtype=torch.long)
            if on_step is not None:
                on_step(k, x, t_vec)
            out = denoise(x, t_vec, k)
            noise = draw(gens, shape).to(device).double() if k + 1 < S else None
            x = self.step(out.double(), k, x.double(), noise).float()
        return x


class PNDMSampler:
    """PLMS (pseudo linear multi-step) as diffusers' PNDMScheduler with ``skip_prk_steps``."""

    def __init__(self, spec: SamplerSpec, scheduler_config: dict):
        if spec.spacing not in ("leading", "linspace"):
            raise PtqbenchError("pndm sampler: spacing must be 'leading' (Stable Diffusion) or "
                                f"'linspace', got {spec.spacing!r}")
        self.spec = spec
        self.scheduler_config = dict(scheduler_config)
        self.timesteps = self._scheduler().timesteps.clone().long()

    def _scheduler(self):
        from diffusers import PNDMScheduler

        config = {k: v for k, v in self.scheduler_config.items() if not k.startswith("_")}
        config.update(skip_prk_steps=True, timestep_spacing=self.spec.spacing)
        sched = PNDMScheduler.from_config(config)
        sched.set_timesteps(self.spec.steps)
        return sched

    @torch.no_grad()
    def run(self, denoise: Denoise, shape, indices, seed, device, on_step: OnStep = None):
        sched = self._scheduler()  # PLMS keeps a history of outputs: one scheduler per run
        gens = sample_generators(seed, indices)
        x = draw(gens, shape).to(device) * float(sched.init_noise_sigma)
        for k, t in enumerate(sched.timesteps.tolist()):
            t_vec = torch.full((x.shape[0],), t, device=device, dtype=torch.long)
            if on_step is not None:
                on_step(k, x, t_vec)
            out = _first_channels(denoise(x, t_vec, k), shape[0])
            x = sched.step(out, t, x).prev_sample
        return x
