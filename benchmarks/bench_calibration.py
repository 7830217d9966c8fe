#!/usr/bin/env python
"""Cost of the calibration-data stages on a real model (run on the GPU machine).

    python benchmarks/bench_calibration.py MODEL_DIR [--device cuda] [--blocks 4]
        [--json out.json] [--variant NAME:key=value,key=value ...]

(or ``python -m benchmarks.bench_calibration ...`` from the repository root; it was
``python -m ptqbench.calib.bench`` before it moved out of the package)

1. records FP trajectories for uniform-steps 20 x 256 + a 5 % validation set (DDIM 100 quad
   steps, as Q-Diffusion on CIFAR-10), then loads them again (cache hit);
2. quantizes W4A8 and runs the real BRECQ loop on the first ``--blocks`` blocks with the
   ``gradient-aligned`` weighting, timing per block the meta steps (before reconstruction) and
   the reconstruction iterations, i.e. the cost of one meta step in reconstruction iterations;
   once per ``--variant`` (GAC options; default: U by autodiff vs materialised, CUDA graph vs
   eager), with the largest weight difference of each variant from the first;
3. repeats one block in ``alternate`` mode with ``torch.cuda.set_sync_debug_mode("error")``
   around every ``observe``/``weights`` call: any host synchronisation in the hot path raises.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import checkout  # noqa: E402,F401  (a bare checkout works too: see checkout.py)

from ptqbench.calib.trajectories import get_trajectories  # noqa: E402
from ptqbench.interfaces import RunContext  # noqa: E402
from ptqbench.quant import QuantRecipe, calibrate_activation_ranges, quantize_model  # noqa: E402
from ptqbench.sampling import SamplerSpec  # noqa: E402


class _Stop(Exception):
    pass


class TimingProbe:
    """Weighting wrapper: times meta steps vs reconstruction per block, optional sync check."""

    def __init__(self, inner, device, max_blocks: int, sync_check: bool = False):
        self.inner, self.device, self.max_blocks, self.sync_check = (inner, device, max_blocks,
                                                                     sync_check)
        self.name = inner.name
        self.rows: list[dict] = []
        self._seen: list[str] = []

    def __getattr__(self, item):
        return getattr(self.inner, item)

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def prepare(self, calib, val, context):
        self.inner.prepare(calib, val, context)

    def begin_block(self, ctx):
        if ctx.block.name not in self._seen:
            if len(self._seen) == self.max_blocks:
                raise _Stop()
            self._seen.append(ctx.block.name)
        self._sync()
        t0 = time.perf_counter()
        self.inner.begin_block(ctx)
        self._sync()
        self._t_meta = time.perf_counter() - t0
        self._t_recon = time.perf_counter()

    def _checked(self, fn, *args):
        if not self.sync_check or self.device.type != "cuda":
            return fn(*args)
        torch.cuda.set_sync_debug_mode("error")
        try:
            return fn(*args)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    def weights(self, idx):
        return self._checked(self.inner.weights, idx)

    def observe(self, iteration, idx, per_sample_loss, ctx):
        self._checked(self.inner.observe, iteration, idx, per_sample_loss, ctx)

    def end_block(self, ctx):
        self._sync()
        recon = time.perf_counter() - self._t_recon
        self.inner.end_block(ctx)
        st = self.inner.state()["blocks"][ctx.block.name]
        params = sum(p.numel() for p in ctx.params.values())
        self.rows.append({"block": ctx.block.name, "phase": getattr(ctx, "phase", None),
                          "quant_params": params, "meta_steps": st["meta_steps"],
                          "meta_seconds": self._t_meta, "recon_iterations": ctx.iterations,
                          "recon_seconds": recon, "autodiff": st["autodiff"],
                          "jacobian": st.get("jacobian")})

    def state(self):
        return self.inner.state()


def _variant(text: str) -> tuple[str, dict]:
    """'name:key=value,key=value' -> (name, options); values parsed as TOML scalars."""
    import tomllib

    name, _, rest = text.partition(":")
    opts = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        value = value.strip()
        opts[key.strip()] = None if value == "none" else tomllib.loads(f"v = {value}")["v"]
    return name, opts


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--per-step", type=int, default=256)
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--meta-steps", type=int, default=20)
    ap.add_argument("--val-batch-size", type=int, default=None)
    ap.add_argument("--cache", default=None)
    ap.add_argument("--variant", action="append", default=[],
                    help="NAME:key=value,... GAC options of one timed run (repeatable)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    from ptqbench_plugins.models.diffusers_unet import DiffusersUNet
    from ptqbench_plugins.reconstructors.brecq import BRECQ
    from ptqbench_plugins.selectors.uniform_steps import UniformSteps
    from ptqbench_plugins.weightings.gradient_aligned import GradientAligned

    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:  # the block caches compare devices
        device = torch.device("cuda", torch.cuda.current_device())
    cache = Path(args.cache or tempfile.mkdtemp())
    out: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                 "torch": torch.__version__}
    adapter = DiffusersUNet(path=args.model)
    fp = adapter.load(device)
    spec = SamplerSpec(steps=args.steps, spacing="quad")
    sel = UniformSteps(per_step=args.per_step, validation_fraction=0.05)
    n = sel.num_trajectories(spec.steps)
    t0 = time.perf_counter()
    traj = get_trajectories(adapter, fp, spec, n, 0, cache, device, 512)
    out["record_seconds"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    traj = get_trajectories(adapter, fp, spec, n, 0, cache, device, 512)
    out["cache_hit_seconds"] = time.perf_counter() - t0
    out["trajectories"] = n
    calib, val = sel.select(traj, torch.Generator().manual_seed(0), None)
    out["calib"], out["val"] = len(calib), len(val)

    def run(weighting, blocks, sync_check):
        qmodel, _ = quantize_model(fp, QuantRecipe.from_options(bits="W4A8"), adapter)
        calibrate_activation_ranges(qmodel, adapter, calib, 256, device)
        ctx = RunContext(device=device, seed=0, work_dir=Path(tempfile.mkdtemp()),
                         cache_dir=cache)
        probe = TimingProbe(weighting, device, blocks, sync_check)
        probe.prepare(calib, val, ctx)
        recon = BRECQ(iters_w=args.iters, iters_a=args.iters, checkpoint=False)
        try:
            recon.reconstruct(fp, qmodel, adapter, calib, val, probe, ctx)
        except _Stop:
            pass
        for r in probe.rows:
            if r["meta_seconds"] > 0.01:  # the block's first phase: where the meta steps ran
                r["meta_step_in_iterations"] = (
                    (r["meta_seconds"] / max(r["meta_steps"], 1))
                    / (r["recon_seconds"] / max(r["recon_iterations"], 1)))
                r["cuda_graph"] = weighting.state()["blocks"][r["block"]].get("cuda_graph")
        return probe.rows, weighting.block_weights

    runs = dict(_variant(v) for v in args.variant) if args.variant else {
        "linearise": dict(jacobian="linearise"), "materialise": dict(jacobian="materialise"),
        "materialise_eager": dict(jacobian="materialise", cuda_graph=False)}
    if args.val_batch_size:
        runs["materialise_val_batch"] = dict(jacobian="materialise",
                                             val_batch_size=args.val_batch_size)
    weights = {}
    for name, opts in runs.items():
        opts = {"meta_steps": args.meta_steps, **opts}
        out[name], weights[name] = run(GradientAligned(**opts), args.blocks, False)
    # same-math variants (graph vs eager, U by autodiff vs materialised) must learn the same
    # weights; options that change the method (batch sizes) may not
    first = next(iter(weights))
    out["max_abs_weight_diff_vs_" + first] = {
        name: {b: float((w[b] - weights[first][b]).abs().max()) for b in w
               if b in weights[first]} for name, w in weights.items() if name != first}
    out["alternate_sync_checked"], _ = run(GradientAligned(meta_steps=args.meta_steps,
                                                           alternate=True), 2, True)
    text = json.dumps(out, indent=1)
    print({k: v for k, v in out.items() if not isinstance(v, list)})
    for key, rows in out.items():
        if isinstance(rows, list):
            print(key)
            for r in rows:
                print(f"  {r['block']:32s} {r['phase']:11s} P={r['quant_params']:7d} "
                      f"meta {r['meta_steps']:3d} x {r['meta_seconds'] / max(r['meta_steps'], 1):.4f}s "
                      f"recon {r['recon_iterations']} x "
                      f"{r['recon_seconds'] / max(r['recon_iterations'], 1):.4f}s "
                      f"ratio {r.get('meta_step_in_iterations', float('nan')):.1f} {r['autodiff']} "
                      f"{r.get('jacobian')} {r.get('cuda_graph') or ''}")
            meta = sum(r["meta_seconds"] for r in rows)
            recon = sum(r["recon_seconds"] for r in rows)
            print(f"  total: meta {meta:.2f} s, reconstruction {recon:.2f} s")
    if args.json:
        Path(args.json).write_text(text)
    return out


if __name__ == "__main__":
    main()
