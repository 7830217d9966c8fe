"""Inception scores of a results folder's samples, where the run could not compute them, and the
floor of FID-to-FP: the FID between FP sample sets of different seeds.

FID-to-FP compares a quantized cell's samples with the FP samples that start from the same noise.
Two FP sets drawn from *different* noise come from the same distribution, so their FID is the
floor of a distribution distance at this sample count (Inception features are 2048-d; at 2,000
samples the estimator's bias alone is several points). Printed for a results folder:

- FP seed i vs FP seed j (the floor, unpaired);
- each quantized cell: FID-to-FP against its own FP samples (paired, as the ``fid-to-fp`` metric
  computes it), against the FP samples of the other seeds (unpaired: its distance from the FP
  *distribution*), and with ``--reference`` the FID against a dataset (as the ``fid`` metric);
- per bit-width and method, the mean over calibration seeds with a 95% t-interval.

A quantized cell whose unpaired distance is at the floor samples the FP distribution; its
FID-to-FP then measures how far its trajectories moved away from their FP twins.

Used when the GPU machine had no Inception weights: the samples travel back
(``gpu_reference_run.sh export-samples``) and are scored here. Features are cached per sample set
in RESULTS/inception-features/ (a second run is quick).

    python benchmarks/fid_floor.py RESULTS_DIR [--reference train_x.npy] [--json FILE]

Needs the samples in RESULTS_DIR/samples and the Inception weights (PTQBENCH_INCEPTION_WEIGHTS).
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

from ptqbench.metrics.bootstrap import t975
from ptqbench.metrics.features import FeatureSet, featurize
from ptqbench.metrics.fid import frechet_distance
from ptqbench.metrics.inception import InceptionFeaturizer, resolve_weights
from ptqbench.metrics.reference import open_reference
from ptqbench.store import Store


def finished_cells(store: Store) -> list[dict]:
    """Finished cells whose samples are all in the store, with the samples (loaded once)."""
    out = []
    for rec in store.records():
        if rec.get("status") != "ok":
            continue
        samples = store.load_samples(rec["gen_key"], rec["num_samples"])
        if samples is None:
            c = rec["cell"]
            print(f"  no samples for {c['method']} {c['bits']} seed {c['seed']}: skipped")
            continue
        out.append({**rec["cell"], "gen_key": rec["gen_key"], "fp_gen_key": rec["fp_gen_key"],
                    "samples": samples,
                    "record_fid_to_fp": rec.get("metrics", {}).get("fid_to_fp", {}).get("value")})
    return out


class Features:
    """Pool features of sample sets, computed once and kept in RESULTS/inception-features/."""

    def __init__(self, store: Store, fz: InceptionFeaturizer, device: str):
        self.fz, self.device = fz, device
        self.folder = store.root / "inception-features"
        self.memo: dict[str, FeatureSet] = {}

    def of(self, name: str, images: np.ndarray) -> FeatureSet:
        if name not in self.memo:
            path = self.folder / f"{name}-{self.fz.weights_sha256[:12]}.pt"
            if path.exists():
                pool = torch.load(path, weights_only=True)
            else:
                pool = featurize(torch.from_numpy(np.ascontiguousarray(images)), self.fz).pool
                self.folder.mkdir(exist_ok=True)
                torch.save(pool, path)
            self.memo[name] = FeatureSet(pool.shape[0], pool)
        return self.memo[name]

    def cell(self, c: dict) -> FeatureSet:
        return self.of(c["gen_key"], c["samples"])


def fid(a: FeatureSet, b: FeatureSet, device: str) -> float:
    return frechet_distance(a.gaussian("pool", device), b.gaussian("pool", device))


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% t-interval (0 for one value)."""
    m = statistics.fmean(values)
    if len(values) < 2:
        return m, 0.0
    return m, t975(len(values) - 1) * statistics.stdev(values) / len(values) ** 0.5


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results")
    ap.add_argument("--reference", default=None,
                    help="images to score FID against (a .npy / .npz / folder, as the fid metric)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    store = Store(args.results)
    cells = finished_cells(store)
    feats = Features(store, InceptionFeaturizer(resolve_weights(download=False), args.device),
                     args.device)
    ref = None
    if args.reference:
        ref = feats.of("reference-" + Path(args.reference).stem,
                       open_reference(args.reference).load().numpy())
    fps = sorted((c for c in cells if c["method"] == "fp"), key=lambda c: c["seed"])
    out = {"floor": [], "cells": []}
    print("FP vs FP, different seeds (unpaired): the floor of FID-to-FP")
    for a, b in itertools.combinations(fps, 2):
        d = fid(feats.cell(a), feats.cell(b), args.device)
        out["floor"].append({"seeds": [a["seed"], b["seed"]], "fid": d})
        print(f"  seed {a['seed']} vs seed {b['seed']}: {d:.3f}")
    fp_by_key = {c["gen_key"]: c for c in fps}
    for c in sorted(cells, key=lambda c: (c["bits"] != "FP", c["bits"], c["method"], c["seed"])):
        f = feats.cell(c)
        row = {k: c[k] for k in ("model", "bits", "method", "seed")}
        if c["method"] != "fp" and c["fp_gen_key"] in fp_by_key:
            row["fid_to_fp"] = fid(f, feats.cell(fp_by_key[c["fp_gen_key"]]), args.device)
            row["record_fid_to_fp"] = c["record_fid_to_fp"]
            row["fid_to_other_fp"] = [fid(f, feats.cell(o), args.device) for o in fps
                                      if o["gen_key"] != c["fp_gen_key"]
                                      and o["model"] == c["model"]]
        if ref is not None:
            row["fid"] = fid(f, ref, args.device)
        out["cells"].append(row)
    print(f"\n{'bits':5s} {'method':12s} {'seed':>4s} {'FID-to-FP':>10s} {'(record)':>9s} "
          f"{'vs other FP':>16s} {'FID':>8s}")
    for r in out["cells"]:
        rec = r.get("record_fid_to_fp")
        print(f"{r['bits']:5s} {r['method']:12s} {r['seed']:4d} "
              f"{r.get('fid_to_fp', float('nan')):10.3f} "
              f"{'-' if rec is None else format(rec, '.3f'):>9s} "
              f"{' '.join(format(v, '.2f') for v in r.get('fid_to_other_fp', [])):>16s} "
              f"{r.get('fid', float('nan')):8.3f}")
    print("\nacross calibration seeds (mean ± 95% t-interval half-width)")
    groups: dict[tuple, list[dict]] = {}
    for r in out["cells"]:
        groups.setdefault((r["bits"], r["method"]), []).append(r)
    out["summary"] = []
    for (bits, method), rows in groups.items():
        s = {"bits": bits, "method": method, "seeds": len(rows)}
        for key in ("fid_to_fp", "fid"):
            vals = [r[key] for r in rows if key in r]
            if vals:
                s[key] = mean_ci(vals)
        other = [statistics.fmean(r["fid_to_other_fp"]) for r in rows if r.get("fid_to_other_fp")]
        if other:
            s["fid_to_other_fp"] = mean_ci(other)
        out["summary"].append(s)
        print(f"{bits:5s} {method:12s} n={len(rows)} " + "  ".join(
            f"{k} {s[k][0]:.2f} ± {s[k][1]:.2f}" for k in ("fid_to_fp", "fid_to_other_fp", "fid")
            if k in s))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
