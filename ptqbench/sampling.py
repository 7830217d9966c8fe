"""DDIM sampling with per-sample seeds.

Sample *i* of a run with seed *s* always starts from the same x_T (and, for eta > 0, draws the same
noise at every step), whatever the batch size or the number of devices: every sample has its own
CPU generator seeded from (s, i). The FP run and every quantized run therefore produce paired
samples, which is what the paired metrics and FID-to-FP rely on.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from .errors import PtqbenchError

SPACINGS = ("uniform", "quad", "leading", "linspace")
#: sampler kinds; ddpm and pndm live in ptqbench.samplers
KINDS = ("ddim", "ddpm", "pndm")


@dataclass(frozen=True)
class SamplerSpec:
    """A sampler as a suite declares it."""

    kind: str = "ddim"
    steps: int = 100
    eta: float = 0.0
    spacing: str = "uniform"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise PtqbenchError(f"unknown sampler kind {self.kind!r}; known: {', '.join(KINDS)}")
        if self.spacing not in SPACINGS:
            raise PtqbenchError(f"unknown timestep spacing {self.spacing!r}; known: {', '.join(SPACINGS)}")
        if self.steps < 1:
            raise PtqbenchError(f"sampler steps must be >= 1, got {self.steps}")
        if not 0.0 <= self.eta <= 1.0:
            raise PtqbenchError(f"sampler eta must be in [0, 1], got {self.eta}")


def ddim_timesteps(steps: int, num_train_timesteps: int, spacing: str) -> np.ndarray:
    """Timesteps visited by DDIM, noisiest first.

    ``uniform``: 0, T/S, 2T/S, ... (DDIM's and Q-Diffusion's "uniform" skip);
    ``quad``: (linspace(0, sqrt(0.8 T), S))^2, the quadratic skip DDIM and Q-Diffusion use for
    CIFAR-10 (denser at low noise);
    ``leading``: uniform + 1, the LDM code's DDIM grid (``steps_offset=1``);
    ``linspace``: round(linspace(0, T-1, S)), DiT's respacing (``space_timesteps``).
    """
    T = num_train_timesteps
    if steps > T:
        raise PtqbenchError(f"{steps} sampler steps exceed the model's {T} training timesteps")
    if spacing in ("uniform", "leading"):
        seq = np.arange(0, T, T // steps)[:steps] + (1 if spacing == "leading" else 0)
        seq = np.minimum(seq, T - 1)
    elif spacing == "linspace":
        seq = np.round(np.linspace(0, T - 1, steps)).astype(np.int64)
    elif spacing == "quad":
        # As in DDIM's and Q-Diffusion's code: the low end can repeat a timestep (e.g. 0, 0, 0);
        # a repeated step is an identity update there, and is kept for comparability.
        seq = (np.linspace(0, np.sqrt(T * 0.8), steps) ** 2).astype(np.int64)
    else:
        raise PtqbenchError(f"unknown spacing {spacing!r}")
    return seq[::-1].astype(np.int64).copy()


def sample_seed(seed: int, index: int) -> int:
    """A distinct 63-bit seed for each (run seed, sample index)."""
    x = (int(seed) * 0x9E3779B97F4A7C15 + int(index) * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB)
    x &= (1 << 64) - 1
    x ^= x >> 31
    return x & ((1 << 63) - 1)


def sample_generators(seed: int, indices) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(sample_seed(seed, int(i))) for i in indices]


def draw(generators: list[torch.Generator], shape: tuple[int, ...]) -> torch.Tensor:
    """One standard-normal tensor of ``shape`` per generator, stacked (CPU, float32)."""
    return torch.stack([torch.randn(shape, generator=g) for g in generators])


class DDIMSampler:
    """DDIM (eta >= 0) on a diffusers scheduler's alphas_cumprod, with an explicit timestep list.

    diffusers' DDIMScheduler assumes evenly spaced steps when it looks up the previous timestep,
    so the quadratic spacing needs the update written out; it is the standard DDIM step
    (Song et al. 2021, eq. 12) and uses the scheduler's own noise schedule.
    """

    def __init__(self, spec: SamplerSpec, scheduler_config: dict):
        from diffusers import DDPMScheduler

        self.spec = spec
        sched = DDPMScheduler.from_config(scheduler_config)
        self.num_train_timesteps = sched.config.num_train_timesteps
        self.alphas_cumprod = sched.alphas_cumprod.double()
        # LDM's DDIM (set_alpha_to_one=False) ends on alphas_cumprod[0], not on 1
        self.final_alpha = (1.0 if scheduler_config.get("set_alpha_to_one", True)
                            else float(self.alphas_cumprod[0]))
        self.prediction_type = sched.config.prediction_type
        self.timesteps = torch.from_numpy(
            ddim_timesteps(spec.steps, self.num_train_timesteps, spec.spacing))

    def alpha(self, t: int) -> float:
        return self.final_alpha if t < 0 else float(self.alphas_cumprod[t])

    def step(self, model_out: torch.Tensor, k: int, x: torch.Tensor,
             noise: Optional[torch.Tensor]) -> torch.Tensor:
        t = int(self.timesteps[k])
        t_prev = int(self.timesteps[k + 1]) if k + 1 < len(self.timesteps) else -1
        a_t, a_prev = self.alpha(t), self.alpha(t_prev)
        if self.prediction_type == "epsilon":
            eps = model_out
            x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t ** 0.5
        elif self.prediction_type == "sample":
            x0 = model_out
            eps = (x - a_t ** 0.5 * x0) / (1 - a_t) ** 0.5
        elif self.prediction_type == "v_prediction":
            x0 = a_t ** 0.5 * x - (1 - a_t) ** 0.5 * model_out
            eps = a_t ** 0.5 * model_out + (1 - a_t) ** 0.5 * x
        else:
            raise PtqbenchError(f"unsupported prediction_type {self.prediction_type!r}")
        sigma = self.spec.eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5
        dir_xt = max(1 - a_prev - sigma ** 2, 0.0) ** 0.5 * eps
        x_prev = a_prev ** 0.5 * x0 + dir_xt
        if sigma > 0 and noise is not None:
            x_prev = x_prev + sigma * noise
        return x_prev

    @torch.no_grad()
    def run(self, denoise: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor],
            shape: tuple[int, int, int], indices, seed: int, device: torch.device,
            on_step: Optional[Callable[[int, torch.Tensor, torch.Tensor], None]] = None
            ) -> torch.Tensor:
        """Sample the given sample indices; returns the final x_0 (float, device).

        ``denoise(x, t_vector, step_index)`` is the model call; ``on_step(k, x_t, t)`` sees the
        denoiser input at every step (trajectory recording).
        """
        gens = sample_generators(seed, indices)
        x = draw(gens, shape).to(device)
        stochastic = self.spec.eta > 0
        for k, t in enumerate(self.timesteps.tolist()):
            t_vec = torch.full((x.shape[0],), t, device=device, dtype=torch.long)
            if on_step is not None:
                on_step(k, x, t_vec)
            out = denoise(x, t_vec, k)
            noise = draw(gens, shape).to(device) if stochastic and k + 1 < len(self.timesteps) else None
            x = self.step(out.double(), k, x.double(), None if noise is None else noise.double()).float()
        return x
