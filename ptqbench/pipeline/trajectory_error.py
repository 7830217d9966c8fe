"""Where along sampling a quantized model drifts from the FP one.

The FP and the quantized model sample the first paired seeds (sample indices 0..n-1 of the cell's
seed: the same x_T and the same per-step noise as the cell's own samples), and at every sampler
step we compare the two trajectories: the squared difference of the denoiser inputs x_t (the
accumulated drift) and of the model outputs (each model on its own trajectory). Stored in the
record as ``trajectory_error``; the HTML report plots it per step.
"""
from __future__ import annotations

import math

import torch

from ..interfaces import ModelAdapter
from ..quant.context import sampler_step
from ..sampling import SamplerSpec

#: how many paired seeds are followed step by step (a second, small sampling pass per cell)
TRAJECTORY_ERROR_SAMPLES = 16


def _per_sample_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.double() - b.double()).pow(2).flatten(1).mean(1)


def _mean_ci(per_sample: torch.Tensor) -> tuple[float, float, float]:
    """Mean over samples with a normal 95% interval (the samples are independent seeds)."""
    n = per_sample.numel()
    mean = float(per_sample.mean())
    half = 1.96 * float(per_sample.std()) / math.sqrt(n) if n > 1 else 0.0
    return mean, mean - half, mean + half


def trajectory_error(adapter: ModelAdapter, fp_model: torch.nn.Module, qmodel: torch.nn.Module,
                     spec: SamplerSpec, seed: int, num_samples: int,
                     device: torch.device) -> dict:
    """Per-step error between the FP and quantized trajectories of the first ``num_samples``
    paired seeds. ``x_mse[k]``: mean squared difference of x_t entering step k (k = steps: the
    final output x_0); ``out_mse[k]``: of the model outputs at step k. ``*_ci``: 95% intervals
    over the samples."""
    sampler = adapter.make_sampler(spec)  # the adapter's loop: sampler kind, guidance passes
    indices = range(num_samples)
    states: list[torch.Tensor] = []
    outputs: list[torch.Tensor] = []

    def fp_denoise(x, t, k, cond):
        out = adapter.guided_denoise(fp_model, x, t, cond)
        outputs.append(out.float())
        return out

    x_mse: list[torch.Tensor] = []
    out_mse: list[torch.Tensor] = []

    def q_denoise(x, t, k, cond):
        with sampler_step(k):  # per-timestep activation parameters pick their set by step
            out = adapter.guided_denoise(qmodel, x, t, cond)
        out_mse.append(_per_sample_mse(out, outputs[k]).cpu())
        return out

    with torch.inference_mode():
        fp_x0 = adapter.run_sampler(fp_denoise, spec, indices, seed, device, sampler=sampler,
                                    on_step=lambda k, x, t: states.append(x.float().clone()))
        q_x0 = adapter.run_sampler(q_denoise, spec, indices, seed, device, sampler=sampler,
                                   on_step=lambda k, x, t: x_mse.append(
                                       _per_sample_mse(x, states[k]).cpu()))
        x_mse.append(_per_sample_mse(q_x0, fp_x0).cpu())
    xs = [_mean_ci(v) for v in x_mse]
    outs = [_mean_ci(v) for v in out_mse]
    return {
        "num_samples": num_samples, "seed": seed, "sample_indices": [0, num_samples],
        "timesteps": sampler.timesteps.tolist(),
        "x_mse": [m for m, _, _ in xs], "x_mse_ci": [[lo, hi] for _, lo, hi in xs],
        "out_mse": [m for m, _, _ in outs], "out_mse_ci": [[lo, hi] for _, lo, hi in outs],
    }
