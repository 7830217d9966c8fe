#!/usr/bin/env python3
"""Throughput of the Inception metric stack: features for FID + sFID of N images, then the metrics.

Featurizes ``--n`` 32x32 uint8 images (CIFAR images tiled with random flips and shifts when a
``--images`` .npy is given or found at ../shared/data/cifar10-partial/train_x.npy, else noise) in
ONE pass per batch (2048-d pool features and the 2023-d sFID features from a hook), exactly as
the metric plugins do, and prints images/s and total seconds. Then it times the computations that
follow: FID/sFID point estimates (factored, float64, on the device), torch-fidelity's own numpy FID
for comparison, the FID bootstrap, KID (torch-fidelity, CPU) and precision/recall (on the device).
Target: < 60 s for 50k images on one H100 with strict fp32 (``--tf32`` measures the TF32 variant).

Runs where only torch, torch-fidelity (with its numpy/pillow/torchvision/tqdm) and this checkout
exist: if ``import ptqbench`` fails (e.g. no pluggy), the ``ptqbench`` package is bound to its
folder without running its ``__init__`` (the metric modules need only ``ptqbench.errors``).

    python3 benchmarks/bench_metrics.py --weights /tmp/w/inception.pth --n 50000 --batch-size 500
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
try:
    import ptqbench  # noqa: F401
except ImportError:
    _pkg = types.ModuleType("ptqbench")
    _pkg.__path__ = [str(ROOT / "ptqbench")]
    sys.modules["ptqbench"] = _pkg

from ptqbench.metrics.features import featurize  # noqa: E402
from ptqbench.metrics.fid import (Gaussian, bootstrap_fid, frechet_distance,  # noqa: E402
                                  frechet_distance_torch_fidelity, statistics)
from ptqbench.metrics.inception import InceptionFeaturizer, resolve_weights  # noqa: E402
from ptqbench.metrics.scores import kid, precision_recall  # noqa: E402

DEFAULT_IMAGES = ROOT.parent / "shared" / "data" / "cifar10-partial" / "train_x.npy"


def make_images(n: int, source: Path | None, seed: int = 0) -> tuple[torch.Tensor, str]:
    """n uint8 (3, 32, 32) images: tiled real images with random flips/shifts, else noise."""
    g = torch.Generator().manual_seed(seed)
    if source is not None and source.is_file():
        base = torch.from_numpy(np.load(source)).permute(0, 3, 1, 2).contiguous()
        idx = torch.randint(0, base.shape[0], (n,), generator=g)
        x = base[idx]
        flip = torch.rand(n, generator=g) < 0.5
        x[flip] = x[flip].flip(-1)
        shifts = torch.randint(-2, 3, (2,), generator=g).tolist()
        return x.roll(shifts, dims=(-2, -1)).contiguous(), f"tiled {source} ({base.shape[0]} images)"
    return torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8), "uniform noise"


def timed(fn, device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", default=None, help="Inception weights (default: env var / hub cache)")
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--batch-size", type=int, default=500)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help="NHWC uint8 .npy to tile")
    ap.add_argument("--tf32", action="store_true",
                    help="allow TF32 convolutions (default: strict fp32)")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--cudnn-benchmark", action="store_true")
    ap.add_argument("--bootstrap", type=int, default=30)
    ap.add_argument("--skip-extras", action="store_true", help="only featurize and FID")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()

    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    res: dict = {"n": args.n, "batch_size": args.batch_size, "device": str(device),
                 "tf32": args.tf32, "channels_last": args.channels_last,
                 "cudnn_benchmark": args.cudnn_benchmark, "torch": torch.__version__}
    if device.type == "cuda":
        res["gpu"] = torch.cuda.get_device_name(device)
    try:
        import torch_fidelity
        res["torch_fidelity"] = torch_fidelity.__version__
    except ImportError:
        sys.exit("torch-fidelity is not importable (carry its wheel and numpy/pillow/torchvision/tqdm)")

    weights = resolve_weights(args.weights, download=False)
    images, res["images"] = make_images(args.n, args.images)
    fz, res["load_s"] = timed(lambda: InceptionFeaturizer(weights, device, args.channels_last), device)
    res["weights_sha256"] = fz.weights_sha256
    warm = images[:args.batch_size]
    _, res["warmup_s"] = timed(lambda: featurize(warm, fz, args.batch_size, args.tf32), device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    fs, secs = timed(lambda: featurize(images, fz, args.batch_size, args.tf32), device)
    res["featurize_s"] = secs
    res["images_per_s"] = args.n / secs
    if device.type == "cuda":
        res["peak_gpu_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    print(f"featurized {args.n} images (pool 2048 + sFID 2023, one pass) in {secs:.2f} s = "
          f"{args.n / secs:.0f} images/s  [{res['images']}, batch {args.batch_size}, "
          f"tf32={args.tf32}, channels_last={args.channels_last}]", flush=True)

    # FID/sFID between the two halves, as the plugins compute it: a reference from statistics
    # (as loaded from the cache) and the samples from raw features.
    half = args.n // 2
    for kind, raw in (("fid", fs.pool), ("sfid", fs.spatial)):
        a, b = raw[:half], raw[half:]
        ref_stats, t_stats = timed(lambda: statistics(b), device)
        ref, t_ref = timed(lambda: Gaussian.from_stats(ref_stats, device), device)
        value, t_fid = timed(lambda: frechet_distance(Gaussian.from_features(a).compact(), ref), device)
        res[f"{kind}_halves"] = value
        res[f"{kind}_reference_stats_s"] = t_stats + t_ref
        res[f"{kind}_point_s"] = t_fid
        print(f"{kind}: {value:.4f} between halves of {half}; "
              f"reference statistics {t_stats + t_ref:.2f} s, "
              f"point estimate {t_fid:.2f} s", flush=True)
        if kind == "fid":
            gen_stats = statistics(a)
            tf_value, t_tf = timed(
                lambda: frechet_distance_torch_fidelity(gen_stats, ref_stats), device)
            res["fid_torch_fidelity"], res["fid_torch_fidelity_s"] = tf_value, t_tf
            print(f"fid (torch-fidelity's numpy eigvals): {tf_value:.4f} in {t_tf:.2f} s; "
                  f"relative difference {abs(tf_value - value) / abs(tf_value):.2e}", flush=True)
            if args.bootstrap:
                reps, t_boot = timed(lambda: bootstrap_fid(a, ref, args.bootstrap, 2020), device)
                res["fid_bootstrap_s"], res["fid_bootstrap_sd"] = t_boot, float(np.std(reps, ddof=1))
                print(f"fid bootstrap: {args.bootstrap} resamples in {t_boot:.2f} s, "
                      f"sd {res['fid_bootstrap_sd']:.4f}", flush=True)

    if not args.skip_extras:
        out, t_kid = timed(lambda: kid(fs.pool[:half], fs.pool[half:]), device)
        res["kid"], res["kid_s"] = out["value"], t_kid
        print(f"kid (torch-fidelity, {out['subsets']} subsets of {out['subset_size']}, CPU): "
              f"{out['value']:.6f} in {t_kid:.2f} s", flush=True)
        (p, r), t_prc = timed(lambda: precision_recall(fs.pool[:half], fs.pool[half:]), device)
        res["precision"], res["recall"], res["prc_s"] = p, r, t_prc
        print(f"precision/recall (k=3, on {device}): {p:.4f} / {r:.4f} in {t_prc:.2f} s", flush=True)

    print(json.dumps(res, indent=1))
    if args.json is not None:
        args.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
