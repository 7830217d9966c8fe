"""How large FID-to-FP is when nothing is wrong: the FID between FP sample sets of different seeds.

FID-to-FP compares a quantized cell's samples with the FP samples that start from the same noise.
Two FP sets drawn from *different* noise come from the same distribution, so their FID is the
floor of a distribution distance at this sample count (Inception features are 2048-d; at 2,000
samples the estimator's bias alone is several points). Printed for a results folder:

- FP seed i vs FP seed j (the floor, unpaired);
- each quantized cell vs its own FP samples (FID-to-FP, paired, as in the record) and vs the FP
  samples of the other seeds (unpaired: the cell's distance from the FP *distribution*).

A quantized cell whose unpaired distance is at the floor samples the FP distribution; its FID-to-FP
then measures how far its trajectories moved away from their FP twins, not a loss of quality.

    python benchmarks/fid_floor.py RESULTS_DIR [--json FILE] [--device cuda]

Needs the samples in RESULTS_DIR/samples and the Inception weights (PTQBENCH_INCEPTION_WEIGHTS).
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np
import torch

from ptqbench.metrics.features import featurize
from ptqbench.metrics.fid import frechet_distance
from ptqbench.metrics.inception import InceptionFeaturizer, resolve_weights
from ptqbench.store import Store


def cell_sets(store: Store) -> list[dict]:
    """Finished cells whose samples are all in the store: cell fields, gen keys, FID-to-FP."""
    out = []
    for rec in store.records():
        if rec.get("status") != "ok":
            continue
        c = rec["cell"]
        samples = store.load_samples(rec["gen_key"], rec["num_samples"])
        if samples is None:
            print(f"  no samples for {c['method']} {c['bits']} seed {c['seed']}: skipped")
            continue
        out.append({**c, "gen_key": rec["gen_key"], "fp_gen_key": rec["fp_gen_key"],
                    "samples": samples,
                    "fid_to_fp": rec.get("metrics", {}).get("fid_to_fp", {}).get("value")})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results")
    ap.add_argument("--json", default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    store = Store(args.results)
    cells = cell_sets(store)
    fz = InceptionFeaturizer(resolve_weights(download=False), args.device)
    gauss = {}
    for c in cells:
        if c["gen_key"] not in gauss:
            images = torch.from_numpy(np.ascontiguousarray(c["samples"]))
            gauss[c["gen_key"]] = featurize(images, fz).gaussian("pool", args.device)
    fps = sorted((c for c in cells if c["method"] == "fp"), key=lambda c: c["seed"])
    rows = {"floor": [], "cells": []}
    print("FP vs FP, different seeds (unpaired): the floor")
    for a, b in itertools.combinations(fps, 2):
        d = frechet_distance(gauss[a["gen_key"]], gauss[b["gen_key"]])
        rows["floor"].append({"seeds": [a["seed"], b["seed"]], "fid": d})
        print(f"  seed {a['seed']} vs seed {b['seed']}: {d:.3f}")
    print(f"{'bits':6s} {'method':12s} {'seed':>4s} {'FID-to-FP (paired)':>19s} "
          f"{'record':>8s} {'vs other seeds FP (unpaired)':>29s}")
    for c in sorted((c for c in cells if c["method"] != "fp"),
                    key=lambda c: (c["bits"], c["method"], c["seed"])):
        g = gauss[c["gen_key"]]
        own = frechet_distance(g, gauss[c["fp_gen_key"]]) if c["fp_gen_key"] in gauss else None
        other = [frechet_distance(g, gauss[f["gen_key"]]) for f in fps
                 if f["gen_key"] != c["fp_gen_key"] and f["model"] == c["model"]]
        rows["cells"].append({k: c[k] for k in ("model", "bits", "method", "seed")} |
                             {"fid_to_fp": own, "record_fid_to_fp": c["fid_to_fp"],
                              "fid_to_other_fp": other})
        rec = f"{c['fid_to_fp']:.3f}" if c["fid_to_fp"] is not None else "-"
        print(f"{c['bits']:6s} {c['method']:12s} {c['seed']:4d} "
              f"{own if own is not None else float('nan'):19.3f} {rec:>8s} "
              f"{'  '.join(f'{v:.3f}' for v in other):>29s}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
