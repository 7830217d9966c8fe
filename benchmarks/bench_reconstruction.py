#!/usr/bin/env python
"""Reconstruction throughput on a diffusers UNet (e.g. cifar10-ddpm-s) and the estimated cost of a
full W4A8 Q-Diffusion calibration (20k AdaRound + 5k step-size iterations per block).

    python benchmarks/bench_reconstruction.py /path/to/cifar10-ddpm-s [--iters 120]
        [--modes eager,graph,compile,compile+graph] [--compile-units kinds] [--json out.json]

What it does:
1. records FP DDIM trajectories (100 quad steps, like Q-Diffusion on CIFAR-10) and takes
   20 uniformly spaced steps x ``--per-step`` samples as calibration data (5120 by default);
2. quantizes with the qdiffusion recipe (W4A8, shortcut split, quantized attention matmuls,
   MSE ranges) and initialises activation ranges;
3. runs the real reconstruction loop (ptqbench.quant.reconstruction) for ``--iters`` iterations
   per phase on every block, once per execution path:
     eager          plain PyTorch (fused Adam, TF32 matmuls/convs, cache on the device)
     graph          each phase's whole step replayed as one CUDA graph
     compile        torch.compile of the block forward + loss (every block recompiles)
     compile+graph  both
   The compile paths run on one block per type (``--compile-units kinds``) unless told ``all``:
   compilation is paid per block and dominates a short benchmark.
4. prints steady-state iterations/s per block type and path, and estimates the full calibration
   time as  sum over blocks of (20000 / rate_weights + 5000 / rate_activations)  + the measured
   per-block overhead (cache replay, targets, outputs) + quantization/range initialisation,
   for each path and for the best path per block (the loop's 'auto' choice is 'graph').
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import checkout  # noqa: E402,F401  (a bare checkout works too: see checkout.py)

from ptqbench.interfaces import CalibSet, RunContext  # noqa: E402
from ptqbench.quant import QuantRecipe, calibrate_activation_ranges, quantize_model  # noqa: E402
from ptqbench.quant.recon_options import ReconConfig  # noqa: E402
from ptqbench.quant.reconstruction import reconstruct_blocks  # noqa: E402
from ptqbench.quant.testing import UniformWeights  # noqa: E402
from ptqbench.sampling import DDIMSampler, SamplerSpec  # noqa: E402
from ptqbench_plugins.models.diffusers_unet import DiffusersUNet  # noqa: E402

FULL_W, FULL_A = 20000, 5000  # Q-Diffusion iterations per block
PATHS = {
    "eager": dict(cuda_graph=False, compile=False),
    "graph": dict(cuda_graph=True, compile=False),
    "compile": dict(cuda_graph=False, compile=True),
    "compile+graph": dict(cuda_graph=True, compile=True,
                          compile_mode="max-autotune-no-cudagraphs"),
}


class _Only(DiffusersUNet):
    """The real adapter with blocks() restricted to a subset (for the compile paths)."""

    def __init__(self, base: DiffusersUNet, only=None):
        self.__dict__.update(base.__dict__)
        self.only = only

    def blocks(self, model):
        blocks = super().blocks(model)
        return blocks if self.only is None else [b for b in blocks if b.name in self.only]


def block_type(name: str, kind: str) -> str:
    """kind@stage, e.g. resnet@down_blocks.0 (blocks of one stage share shapes)."""
    parts = name.split(".")
    stage = ".".join(parts[:2]) if parts[0] in ("down_blocks", "up_blocks") else parts[0]
    return f"{kind}@{stage}"


def calibration_data(adapter, model, device, per_step: int, seed: int) -> CalibSet:
    spec = SamplerSpec(steps=100, eta=0.0, spacing="quad")
    sampler = DDIMSampler(spec, adapter.scheduler_config)
    keep = set(range(0, 100, 5))  # 20 uniformly spaced sampler steps
    xs, ts, ks = [], [], []

    def on_step(k, x, t):
        if k in keep:
            xs.append(x.detach().cpu())
            ts.append(t.detach().cpu())
            ks.append(torch.full((x.shape[0],), k, dtype=torch.long))

    with torch.no_grad():
        for start in range(0, per_step, 512):
            idx = list(range(start, min(per_step, start + 512)))
            sampler.run(lambda x, t, k: adapter.denoise(model, x, t), adapter.sample_shape, idx,
                        seed, device, on_step=on_step)
    return CalibSet(torch.cat(xs), torch.cat(ts), torch.cat(ks))


def run_path(path: str, fp_model, qmodel, adapter, calib, device, iters: int, only,
             fbs: int) -> dict:
    opts = {**PATHS[path], "iters_w": iters, "iters_a": iters, "checkpoint": False,
            "eval_samples": 256, "forward_batch_size": fbs, "log_every": max(iters, 1)}
    cfg = ReconConfig.from_options("brecq", {}, opts)
    q = copy.deepcopy(qmodel)
    ctx = RunContext(device=device, seed=0, work_dir=Path(tempfile.mkdtemp()),
                     cache_dir=Path(tempfile.gettempdir()))
    t0 = time.perf_counter()
    res = reconstruct_blocks(fp_model, q, _Only(adapter, only), calib, None, UniformWeights(),
                             ctx, cfg, "brecq")
    res["wall"] = time.perf_counter() - t0
    del q
    torch.cuda.empty_cache() if device.type == "cuda" else None
    return res


def summarise(results: dict, types: dict, iters: int) -> dict:
    per_unit = defaultdict(dict)  # unit -> path -> (rate_w, rate_a, overhead_s, compile-ish)
    for path, res in results.items():
        for b in res["blocks"]:
            ph = {p["phase"]: p for p in b.get("phases", [])}
            rw = ph.get("weights", {}).get("steady_iters_per_s")
            ra = ph.get("activations", {}).get("steady_iters_per_s")
            loop_s = sum(p.get("seconds", 0.0) for p in ph.values())
            per_unit[b["name"]][path] = {
                "rate_w": rw, "rate_a": ra, "overhead_s": b["seconds"] - loop_s,
                "first_iters_s": sum(p.get("seconds", 0.0) - (iters - 10) / p["steady_iters_per_s"]
                                     for p in ph.values() if p.get("steady_iters_per_s")),
                "mse_before": b.get("mse_before"), "mse_after": b.get("mse_after")}
    return per_unit


def estimate(per_unit: dict, path: str | None, fixed_s: float) -> float | None:
    total = fixed_s
    for unit, paths in per_unit.items():
        cands = [paths[path]] if path else list(paths.values())
        best = None
        for c in cands:
            if c is None:
                continue
            t = c["overhead_s"]
            for rate, n in ((c["rate_w"], FULL_W), (c["rate_a"], FULL_A)):
                if rate:
                    t += n / rate
            best = t if best is None else min(best, t)
        if best is None:
            return None
        total += best
    return total


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("path", help="diffusers model folder (unet/ + scheduler/)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--iters", type=int, default=120, help="iterations per phase and block")
    ap.add_argument("--per-step", type=int, default=256, help="calibration samples per step")
    ap.add_argument("--modes", default="eager,graph,compile,compile+graph")
    ap.add_argument("--compile-units", default="kinds",
                    help="'kinds' (one block per type), 'all', or comma-separated block names")
    ap.add_argument("--evidence", default="",
                    help="comma-separated blocks to reconstruct with the full brecq defaults "
                         "(20k + 5k iterations), printing block-output MSE of RTN vs BRECQ")
    ap.add_argument("--evidence-iters", default="20000,5000",
                    help="weight,activation iterations of --evidence")
    ap.add_argument("--forward-batch-size", type=int, default=256)
    ap.add_argument("--json", default=None, help="write all measurements here")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type != "cuda":
        print("warning: not on CUDA; the graph paths fall back to eager", file=sys.stderr)
    torch.backends.cudnn.benchmark = True

    adapter = DiffusersUNet(args.path)
    fp_model = adapter.load(device)
    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "iters_per_phase": args.iters}
    t0 = time.perf_counter()
    calib = calibration_data(adapter, fp_model, device, args.per_step, seed=0)
    info["trajectory_seconds"] = time.perf_counter() - t0
    info["calibration_samples"] = len(calib)
    recipe = QuantRecipe.from_options(bits="W4A8", split_shortcut=True, quantize_attention=True,
                                      weight_init="mse", act_init="mse")
    t0 = time.perf_counter()
    qmodel, manifest = quantize_model(fp_model, recipe, adapter)
    info["quantize_seconds"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    calibrate_activation_ranges(qmodel, adapter, calib, 256, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    info["act_range_seconds"] = time.perf_counter() - t0
    print(f"{info['device']}: {len(calib)} calibration samples; quantize "
          f"{info['quantize_seconds']:.1f}s, activation ranges {info['act_range_seconds']:.1f}s, "
          f"{manifest['counts']['quantized_layers']} layers, "
          f"{manifest['counts']['quantized_matmuls']} matmuls")

    blocks = adapter.blocks(fp_model)
    types = {b.name: block_type(b.name, b.kind) for b in blocks}
    reps, seen = [], set()
    for b in blocks:  # one block per type for the compile paths
        key = (b.kind, tuple(p.shape for p in b.module.parameters())[:1])
        if key not in seen:
            seen.add(key)
            reps.append(b.name)
    results = {}
    for path in [m.strip() for m in args.modes.split(",") if m.strip()]:
        if path not in PATHS:
            ap.error(f"unknown mode {path!r}; known: {', '.join(PATHS)}")
        only = None
        if path.startswith("compile") and args.compile_units != "all":
            only = reps if args.compile_units == "kinds" else args.compile_units.split(",")
        print(f"-- {path}: {len(only) if only else len(blocks)} blocks x {args.iters} iterations "
              "per phase", flush=True)
        try:
            results[path] = run_path(path, fp_model, qmodel, adapter, calib, device, args.iters,
                                     only, args.forward_batch_size)
        except Exception as exc:  # report and go on with the other paths
            print(f"   {path} failed: {exc!r}")
            continue
        print(f"   wall {results[path]['wall']:.1f}s, cache peak "
              f"{results[path]['cache_peak_bytes'] / 2**30:.2f} GiB")
    per_unit = summarise(results, types, args.iters)

    # per block type table (median over blocks of that type)
    print(f"\n{'block type':26s} {'n':>3s} " + " ".join(f"{p + ' W/A it/s':>24s}" for p in results))
    by_type = defaultdict(list)
    for unit in per_unit:
        by_type[types.get(unit, "?")].append(unit)
    for t, units in by_type.items():
        cells = []
        for p in results:
            rw = sorted(per_unit[u][p]["rate_w"] for u in units if p in per_unit[u]
                        and per_unit[u][p]["rate_w"])
            ra = sorted(per_unit[u][p]["rate_a"] for u in units if p in per_unit[u]
                        and per_unit[u][p]["rate_a"])
            cells.append(f"{rw[len(rw) // 2]:10.0f} / {ra[len(ra) // 2]:<10.0f}" if rw and ra
                         else f"{'-':>24s}")
        print(f"{t:26s} {len(units):3d} " + " ".join(f"{c:>24s}" for c in cells))

    fixed = info["quantize_seconds"] + info["act_range_seconds"]
    print(f"\nestimated full W4A8 qdiffusion calibration ({FULL_W} + {FULL_A} iterations per "
          f"block, {len(per_unit)} blocks, {len(calib)} samples; trajectories excluded):")
    est = {}
    for p in results:
        if all(p in per_unit[u] for u in per_unit):
            est[p] = estimate({u: {p: v[p]} for u, v in per_unit.items()}, p, fixed)
            print(f"  {p:14s} {est[p] / 60:7.1f} min")
    # mixed: the compile paths measured on representatives only -> apply their speed-up ratio
    # to every block of the same type
    for p in results:
        if p in est:
            continue
        ratio = {}
        for t, units in by_type.items():
            base = [u for u in units if p in per_unit[u] and "eager" in per_unit[u]]
            if base:
                u = base[0]
                ratio[t] = {k: (per_unit[u][p][k] / per_unit[u]["eager"][k]
                                if per_unit[u][p][k] and per_unit[u]["eager"][k] else None)
                            for k in ("rate_w", "rate_a")}
        if "eager" in results and len(ratio) == len(by_type):
            scaled = {}
            for u, v in per_unit.items():
                r = ratio[types[u]]
                e = v["eager"]
                scaled[u] = {p: {"rate_w": e["rate_w"] * r["rate_w"] if r["rate_w"] and e["rate_w"] else e["rate_w"],
                                 "rate_a": e["rate_a"] * r["rate_a"] if r["rate_a"] and e["rate_a"] else e["rate_a"],
                                 "overhead_s": e["overhead_s"]}}
            est[p] = estimate(scaled, p, fixed)
            print(f"  {p:14s} {est[p] / 60:7.1f} min  (speed-up per block type measured on one "
                  f"block of each type; compile time not included)")
    best = estimate(per_unit, None, fixed) if per_unit else None
    if best is not None:
        print(f"  {'best per block':14s} {best / 60:7.1f} min   target < 15 min")
    info["estimate_minutes"] = {k: v / 60 for k, v in est.items()}
    if best is not None:
        info["estimate_minutes"]["best"] = best / 60
    if args.evidence:
        iw, ia = (int(v) for v in args.evidence_iters.split(","))
        cfg = ReconConfig.from_options("brecq", {}, {"iters_w": iw, "iters_a": ia,
                                                     "checkpoint": False, "eval_samples": 1024,
                                                     "forward_batch_size": args.forward_batch_size})
        ctx = RunContext(device=device, seed=0, work_dir=Path(tempfile.mkdtemp()),
                         cache_dir=Path(tempfile.gettempdir()))
        only = args.evidence.split(",")
        res = reconstruct_blocks(fp_model, copy.deepcopy(qmodel), _Only(adapter, only), calib,
                                 None, UniformWeights(), ctx, cfg, "brecq")
        print(f"\nblock-output MSE, W4A8 qdiffusion recipe, quantized inputs, first 1024 "
              f"calibration samples (brecq {iw}+{ia} iterations):")
        print(f"{'block':32s} {'RTN':>11s} {'BRECQ':>11s} {'ratio':>7s} {'seconds':>8s}")
        for b in res["blocks"]:
            print(f"{b['name']:32s} {b['mse_before']:11.4e} {b['mse_after']:11.4e} "
                  f"{b['mse_after'] / b['mse_before']:7.3f} {b['seconds']:8.1f}  "
                  + " ".join(f"{p['phase']}:{p.get('path')}:{p.get('steady_iters_per_s') or 0:.0f}it/s"
                             for p in b.get("phases", [])))
        info["evidence"] = res["blocks"]
    if args.json:
        Path(args.json).write_text(json.dumps({"info": info, "per_unit": per_unit,
                                               "types": types, "results": results},
                                              indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
