"""Gradient conflict across timesteps (and GAC's learned weights) for one block of one cell,
computed inside the cell's real reconstruction run (the ``ptqbench diagnose`` command's work;
its command line is :mod:`ptqbench.commands.diagnose`).

The cell is chosen from the suite by --model/--method/--bits/--sampler/--seed (the first
quantized cell that matches). The run goes exactly as ``ptqbench run`` would (trajectories,
selection, quantization, activation ranges, block-wise reconstruction), with the weighting
wrapped in a :class:`~ptqbench.calib.diagnostics.BlockProbe` that writes the diagnostics when the
chosen block starts and stops the run when its first phase ends. Blocks before it are
reconstructed normally (their outputs are the block's inputs); ``--iterations`` shortens them
for a quick look, at the price of inputs that differ from the real run's.
Scratch files (reconstruction checkpoints) go to OUT/work, never to the suite's results.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from ..errors import PtqbenchError


def _pick_cell(cells, model, method, bits, sampler, seed):
    def ok(c):
        return ((model is None or c.model == model) and (method is None or c.method == method)
                and (bits is None or c.bits == bits) and (sampler is None or c.sampler == sampler)
                and (seed is None or c.seed == seed) and not c.is_fp)
    matches = [c for c in cells if ok(c)]
    if not matches:
        known = sorted({f"{c.model}/{c.method}/{c.bits}" for c in cells if not c.is_fp})
        raise PtqbenchError(f"no quantized cell matches; cells: {', '.join(known) or '(none)'}")
    return matches[0]


def _device(name: Optional[str]) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def run_diagnosis(suite: Optional[Path], block: str, out: Path, model: Optional[str] = None,
                  method: Optional[str] = None, bits: Optional[str] = None,
                  sampler: Optional[str] = None, seed: Optional[int] = None,
                  device: Optional[str] = None, iterations: Optional[int] = None,
                  max_per_step: Optional[int] = 64, max_samples: Optional[int] = 256,
                  list_blocks: bool = False) -> dict:
    """Run one cell up to ``block`` and write its diagnostics under ``out``; returns the paths
    (and block names when ``list_blocks``)."""
    from ..interfaces import RunContext
    from ..pipeline.cell import CellRunner
    from ..pipeline.runner import prepare
    from ..quant import QuantRecipe, calibrate_activation_ranges, quantize_model
    from ..store import Store
    from .diagnostics import BlockProbe, DiagnosisDone
    from .trajectories import get_trajectories

    loaded, registry, cells = prepare(suite, writable=None if list_blocks else {"--out": out})
    cell = _pick_cell(cells, model, method, bits, sampler, seed)
    dev = _device(device)
    results = Path(loaded.suite.suite.output)
    cache = Path(loaded.suite.run.cache_dir) if loaded.suite.run.cache_dir else results / "cache"
    runner = CellRunner(loaded, registry, Store(results), cache)
    adapter = runner.adapter(cell.model)
    fp_model = adapter.load(dev)
    names = [b.name for b in adapter.blocks(fp_model)]
    if list_blocks:
        return {"cell": cell.title(), "blocks": names}
    if block not in names:
        raise PtqbenchError(f"no block {block!r} in {cell.model}; blocks: {', '.join(names)}")
    m = cell.resolved
    spec = runner.sampler_spec(cell)
    out = Path(out)
    ctx = RunContext(device=dev, seed=cell.seed, work_dir=out / "work", cache_dir=cache)
    selector = registry.create("selectors", m.selector, m.selector_options)
    weighting = registry.create("weightings", m.weighting, m.weighting_options)
    recon_options = dict(m.reconstructor_options)
    if iterations is not None:
        recon_options.update(iters_w=iterations, iters_a=iterations)
    reconstructor = registry.create("reconstructors", m.reconstructor, recon_options)
    steps = spec.steps
    traj_opts = (selector.trajectory_options(steps) if hasattr(selector, "trajectory_options")
                 else {"num_samples": selector.num_trajectories(steps),
                       "with_features": getattr(selector, "needs_features", False)})
    if m.calibration_trajectories:
        traj_opts["num_samples"] = m.calibration_trajectories
    batch = m.calibration_batch_size or loaded.suite.evaluation.batch_size
    traj = get_trajectories(adapter, fp_model, spec, seed=cell.seed, cache_dir=cache, device=dev,
                            batch_size=batch, **traj_opts)
    calib, val = selector.select(traj, torch.Generator().manual_seed(cell.seed), ctx)
    recipe = QuantRecipe.from_options(bits=cell.bits, **m.recipe)
    qmodel, _ = quantize_model(fp_model, recipe, adapter)
    calibrate_activation_ranges(qmodel, adapter, calib, batch, dev)
    probe = BlockProbe(weighting, block, out, max_per_step, max_samples, cell.seed)
    probe.prepare(calib, val, ctx)
    try:
        reconstructor.reconstruct(fp_model, qmodel, adapter, calib, val, probe, ctx)
    except DiagnosisDone as done:
        result = dict(done.result, cell=cell.title())
        (out / "diagnosis.json").write_text(json.dumps(result, indent=1))
        return result
    raise PtqbenchError(f"the reconstructor never optimised block {block!r} (it may have no "
                        f"quantization parameters, or the method does not reconstruct)")
