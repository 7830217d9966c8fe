"""Shared set-up of the scripts that look inside one block's reconstruction on a real model
(gac_share.py, gac_trace.py): a calibration set, the quantized model with its activation ranges,
and a walk through the real BRECQ loop (one iteration per phase) that a weighting can stop."""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from ptqbench.calib.trajectories import get_trajectories
from ptqbench.interfaces import RunContext
from ptqbench.quant import QuantRecipe, calibrate_activation_ranges, quantize_model
from ptqbench.sampling import SamplerSpec
from ptqbench_plugins.models.diffusers_unet import DiffusersUNet
from ptqbench_plugins.reconstructors.brecq import BRECQ


class StopWalk(Exception):
    """Raised by a probing weighting once it has seen the blocks it wanted."""


def calibrated_model(model_dir: str, dev: torch.device, spec: SamplerSpec, selector, bits: str,
                     cache: Path, seed: int = 0, batch: int = 64, **recipe):
    """(adapter, FP model, quantized model with calibrated activation ranges, calib, val)."""
    adapter = DiffusersUNet(path=model_dir)
    fp = adapter.load(dev)
    traj = get_trajectories(adapter, fp, spec, selector.num_trajectories(spec.steps), seed,
                            cache, dev, batch)
    calib, val = selector.select(traj, torch.Generator().manual_seed(seed), None)
    qmodel, _ = quantize_model(fp, QuantRecipe.from_options(bits=bits, **recipe), adapter)
    calibrate_activation_ranges(qmodel, adapter, calib, batch, dev)
    return adapter, fp, qmodel, calib, val


def walk_blocks(adapter, fp, qmodel, calib, val, weighting, dev: torch.device, cache: Path,
                seed: int = 0) -> None:
    """The BRECQ loop with one iteration per phase, each block's inputs those of a quick run,
    until ``weighting`` raises StopWalk (or the last block)."""
    run = RunContext(device=dev, seed=seed, work_dir=Path(tempfile.mkdtemp()), cache_dir=cache)
    weighting.prepare(calib, val, run)
    try:
        BRECQ(iters_w=1, iters_a=1, checkpoint=False, eval_samples=0).reconstruct(
            fp, qmodel, adapter, calib, val, weighting, run)
    except StopWalk:
        pass
