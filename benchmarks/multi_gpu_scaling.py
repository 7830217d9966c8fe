"""Issue #18: scaling of a suite over 1/2/4 GPUs, and of one cell's sampling sharded over them.

One call per machine measures every GPU count the machine has (of ``--gpus``), each from a fresh
output folder, with the multi-gpu executor:

* ``suite``: cifar10-ddpm-s, fp + rtn + qdiffusion at W8A8 and W4A8 (5 cells), ``--samples``
  samples per cell: wall-clock, GPU-busy fraction (nvidia-smi's utilization of the GPUs used,
  averaged over the run), speed-up and efficiency against one GPU;
* ``shard``: the FP cell alone with ``--shard-samples`` samples, ``sample_shards = N``: the same,
  and whether its samples are the bytes of the one-GPU run.

Speed-up needs the one-GPU wall-clock: measured in the same call when 1 is among ``--gpus``, or
read from an earlier call's JSON (``--baseline``, e.g. the single-GPU machine's run; same GPU
model). Writes ``benchmarks/results/multi_gpu_scaling-<date>-<N>x<gpu>.{json,md}`` (date, GPUs,
command, versions, every number) and prints the table.

    source benchmarks/device_env.sh           # on the GPU machine (installs ptqbench, links data)
    python benchmarks/multi_gpu_scaling.py    # the issue's sizes: 10k / 50k samples
    python benchmarks/multi_gpu_scaling.py --gpus 1 --samples 2000 --shard-samples 10000 \\
        --iters-w 400 --iters-a 100           # a one-GPU baseline that fits a 10-minute call
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO.parent / "shared" / "data" / "models" / "cifar10-ddpm-s"


def suite_text(name: str, model, methods: list[str], samples: int, batch: int, devices: list[str],
               shards: int, iters_w: int, iters_a: int, metrics: list[str], steps: int = 100,
               smoke: bool = False) -> str:
    devices = json.dumps(devices)
    # the smoke test's small calibration (the presets' 20 steps x 256 samples take long on CPU)
    calib = "selector_options = { steps = 2, per_step = 8 }" if smoke else ""
    rtn = f"[methods.rtn]\n{calib}" if smoke else ""
    bits = '["W8A8", "W4A8"]' if methods != ["fp"] else '["W8A8"]'
    return f"""
[suite]
name = "{name}"
output = "unused"

[models.cifar10-ddpm-s]
plugin = "diffusers-unet"
path = "{model}"

[samplers.ddim100-quad]
kind = "ddim"
steps = {steps}
eta = 0.0
spacing = "quad"

[grid]
models = ["cifar10-ddpm-s"]
samplers = ["ddim100-quad"]
bits = {bits}
methods = {json.dumps(methods)}
seeds = [0]

[evaluation]
num_samples = {samples}
batch_size = {batch}
metrics = {json.dumps(metrics)}

[methods.qdiffusion]
reconstructor_options = {{ iters_w = {iters_w}, iters_a = {iters_a} }}
{calib}

{rtn}

[run]
executor = "multi-gpu"
executor_options = {{ devices = {devices}, sample_shards = {shards} }}
"""


class GpuBusy:
    """Polls nvidia-smi's utilization (percent of time a kernel ran) of some GPUs."""

    def __init__(self, gpus: list[int], period_ms: int = 500):
        self.gpus, self.period_ms = gpus, period_ms
        self.samples: dict[int, list[float]] = {g: [] for g in gpus}
        self._proc = None
        self._thread = None

    def __enter__(self):
        if shutil.which("nvidia-smi") is None:
            return self
        self._proc = subprocess.Popen(
            ["nvidia-smi", "--query-gpu=index,utilization.gpu", "--format=csv,noheader,nounits",
             f"-lms={self.period_ms}"], stdout=subprocess.PIPE, text=True)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        return self

    def _read(self):
        for line in self._proc.stdout:
            try:
                index, util = (int(x) for x in line.split(","))
            except ValueError:
                continue
            if index in self.samples:
                self.samples[index].append(util / 100.0)

    def __exit__(self, *exc):
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait()
            self._thread.join(timeout=5)

    def fraction(self):
        per_gpu = [sum(v) / len(v) for v in self.samples.values() if v]
        return round(sum(per_gpu) / len(per_gpu), 3) if per_gpu else None


def run_suite(work: Path, label: str, text: str, devices: list[str]) -> dict:
    folder = work / label
    if folder.exists():
        shutil.rmtree(folder)  # every measurement starts from nothing (caches included)
    folder.mkdir(parents=True)
    suite = folder / "suite.toml"
    suite.write_text(text)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    t0 = time.perf_counter()
    with GpuBusy([int(d.split(":")[1]) for d in devices if d.startswith("cuda:")]) as busy:
        proc = subprocess.run([sys.executable, "-m", "ptqbench.cli", "run", str(suite), "-o",
                               str(folder / "out"), "--no-progress"], env=env,
                              capture_output=True, text=True)
    wall = time.perf_counter() - t0
    (folder / "run.log").write_text(proc.stdout + proc.stderr)
    recs = [json.loads(p.read_text()) for p in sorted((folder / "out" / "records").glob("*.json"))]
    return {"label": label, "gpus": len(devices), "wall_s": round(wall, 2), "exit": proc.returncode,
            "gpu_busy": busy.fraction(), "cells": len(recs),
            "cells_ok": sum(r["status"] == "ok" for r in recs),
            "errors": [r["error"]["message"][:200] for r in recs if r["status"] != "ok"],
            "gen_keys": sorted({r["gen_key"] for r in recs}), "out": str(folder / "out"),
            "tail": (proc.stdout + proc.stderr)[-1500:] if proc.returncode else ""}


def same_samples(a: dict, b: dict, num_samples: int) -> dict:
    """Compare every cell's samples of two runs (same gen keys: same cells)."""
    import numpy as np

    from ptqbench.store import Store

    worst, equal = 0, True
    for key in a["gen_keys"]:
        x = Store(a["out"]).load_samples(key, num_samples)
        y = Store(b["out"]).load_samples(key, num_samples)
        if x is None or y is None:
            return {"equal": False, "max_abs_diff": None, "note": f"samples of {key} missing"}
        d = int(np.abs(x.astype(np.int16) - y.astype(np.int16)).max())
        worst, equal = max(worst, d), equal and bool(np.array_equal(x, y))
    return {"equal": equal, "max_abs_diff": worst}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpus", default="1,2,4", help="GPU counts to measure (those the machine has)")
    ap.add_argument("--parts", default="suite,shard", help="suite, shard or both")
    ap.add_argument("--samples", type=int, default=10000, help="samples per cell of the suite")
    ap.add_argument("--shard-samples", type=int, default=50000, help="samples of the sharded cell")
    ap.add_argument("--batch-size", type=int, default=1000)
    ap.add_argument("--iters-w", type=int, default=2000, help="qdiffusion weight iterations/block")
    ap.add_argument("--iters-a", type=int, default=500, help="qdiffusion activation iterations/block")
    ap.add_argument("--metrics", default="paired", help="comma-separated (fid needs Inception weights)")
    ap.add_argument("--model", default=str(DEFAULT_MODEL), help="model folder (or builtin:NAME)")
    ap.add_argument("--steps", type=int, default=100, help="DDIM steps (quad spacing)")
    ap.add_argument("--cpu", action="store_true",
                    help="smoke test of this script on CPU worker processes (no GPU numbers)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/ptq-scaling"))
    ap.add_argument("--baseline", type=Path, help="JSON of an earlier call with the 1-GPU runs")
    ap.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results")
    args = ap.parse_args()

    import torch

    have = 4 if args.cpu else torch.cuda.device_count()
    if have == 0:
        sys.exit("no CUDA device: this benchmark measures GPUs (--cpu: a smoke test)")
    if not args.model.startswith("builtin:") and not Path(args.model).is_dir():
        sys.exit(f"model not found: {args.model} (source benchmarks/device_env.sh, or --model)")
    wanted = sorted({int(g) for g in args.gpus.split(",")})
    counts = [n for n in wanted if n <= have]
    skipped = [n for n in wanted if n > have]
    gpu_name = "cpu" if args.cpu else torch.cuda.get_device_name(0)
    metrics = [m for m in args.metrics.split(",") if m]
    parts = [p for p in args.parts.split(",") if p]
    print(f"{have} x {gpu_name}; measuring {counts}" + (f", skipping {skipped} (not here)" if skipped else ""),
          flush=True)

    baseline = json.loads(args.baseline.read_text()) if args.baseline else {}
    runs: list[dict] = []
    for part in parts:
        for n in counts:
            devices = ["cpu"] * n if args.cpu else [f"cuda:{i}" for i in range(n)]
            if part == "suite":
                text = suite_text("scaling-suite", args.model, ["fp", "rtn", "qdiffusion"],
                                  args.samples, args.batch_size, devices, 1, args.iters_w,
                                  args.iters_a, metrics, args.steps, args.cpu)
            elif part == "shard":
                text = suite_text("scaling-shard", args.model, ["fp"], args.shard_samples,
                                  args.batch_size, devices, n, args.iters_w, args.iters_a,
                                  metrics, args.steps, args.cpu)
            else:
                sys.exit(f"unknown part {part!r} (suite, shard)")
            res = run_suite(args.work, f"{part}-{n}gpu", text, devices)
            res["part"] = part
            runs.append(res)
            print(f"  {part} on {n} GPU(s): {res['wall_s']:.1f} s, busy {res['gpu_busy']}, "
                  f"{res['cells_ok']}/{res['cells']} cells ok, exit {res['exit']}", flush=True)
            if res["exit"]:
                print(res["tail"], flush=True)

    # speed-up against the one-GPU run of the same part (this call's, else the baseline's)
    for res in runs:
        one = next((r for r in runs if r["part"] == res["part"] and r["gpus"] == 1), None) or \
            next((r for r in baseline.get("runs", []) if r["part"] == res["part"] and r["gpus"] == 1), None)
        res["speedup"] = round(one["wall_s"] / res["wall_s"], 3) if one else None
        res["efficiency"] = round(res["speedup"] / res["gpus"], 3) if one else None
        if one and res is not one and os.path.isdir(one["out"]):
            n = args.samples if res["part"] == "suite" else args.shard_samples
            res["vs_one_gpu"] = same_samples(one, res, n)

    header = ("part", "GPUs", "cells ok", "wall s", "GPU busy", "speed-up", "x/N", "samples = 1 GPU")
    rows = [(r["part"], r["gpus"], f"{r['cells_ok']}/{r['cells']}", f"{r['wall_s']:.1f}",
             "n/a" if r["gpu_busy"] is None else f"{r['gpu_busy']:.2f}",
             "n/a" if r["speedup"] is None else f"{r['speedup']:.2f}",
             "n/a" if r["efficiency"] is None else f"{r['efficiency']:.2f}",
             "(reference)" if r["gpus"] == 1 else
             ("n/a" if "vs_one_gpu" not in r else
              ("equal" if r["vs_one_gpu"]["equal"] else f"max diff {r['vs_one_gpu']['max_abs_diff']}")))
            for r in runs]
    table = "| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n" + \
        "\n".join("| " + " | ".join(str(c) for c in row) + " |" for row in rows) + "\n"
    print("\n" + table)

    import diffusers

    from ptqbench.environment import git_info

    stamp = time.strftime("%Y-%m-%d")
    meta = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "gpus_here": have, "gpu": gpu_name,
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "host": platform.node(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "diffusers": diffusers.__version__, "git": git_info(), "args": {
                k: str(v) for k, v in vars(args).items()}, "skipped_gpu_counts": skipped,
            "goal": "speed-up >= 0.9 x N with >= 2 cells per GPU (suite); equal samples (shard)"}
    args.results.mkdir(parents=True, exist_ok=True)
    base = args.results / f"multi_gpu_scaling-{stamp}-{have}x{gpu_name.replace(' ', '_')}"
    base.with_suffix(".json").write_text(json.dumps({**meta, "runs": runs}, indent=1))
    base.with_suffix(".md").write_text(
        f"# Multi-GPU scaling, {meta['date']}\n\n{have} x {gpu_name}, torch {torch.__version__}, "
        f"commit {meta['git'].get('commit')}\n\n`{meta['command']}`\n\n{table}\n"
        f"GPU busy: nvidia-smi utilization of the GPUs used, averaged over the run (startup and "
        f"model loading included). Speed-up: one-GPU wall-clock / this wall-clock.\n")
    print(f"wrote {base.with_suffix('.json')} and .md")


if __name__ == "__main__":
    main()
