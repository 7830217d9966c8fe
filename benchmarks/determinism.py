"""Deterministic mode on the GPU: chosen cells run twice (bit-identical records?) and once
without deterministic mode (its cost), in one call; prints a table and writes JSON.

    python benchmarks/determinism.py SUITE [--cell KEYPREFIX ...] [-o DIR] [--json FILE]

Each run writes into its own output folder (nothing reused: trajectories, calibration, sampling
and metrics all run again), with ``[run] deterministic`` forced on (runs 1 and 2) and off (run
3). Records are compared with ``ptqbench.reproducible.comparable`` (timings, speeds, memory
peaks and dates left out).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from ptqbench.pipeline.runner import prepare, run_suite, select_cells
from ptqbench.reproducible import differences

CALIB_STAGES = ("trajectories", "select", "quantize", "reconstruct")


def run_once(suite: str, select: dict, out: Path, deterministic: bool
             ) -> tuple[dict[str, dict], float]:
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    summary = run_suite(suite, output=out, select=select or None, deterministic=deterministic)
    seconds = time.perf_counter() - t0
    records = {c.key: json.loads((out / "records" / f"{c.key}.json").read_text())
               for c in summary.cells}
    return records, seconds


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("suite")
    ap.add_argument("--cell", action="append", default=[],
                    help="key prefix of a cell (see ptqbench run --dry-run); repeatable; "
                         "default: every cell of the suite")
    ap.add_argument("--method", action="append", default=[],
                    help="only this method's cells (and their FP cells); repeatable")
    ap.add_argument("-o", "--out", default="/tmp/ptq-determinism")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    _, _, cells = prepare(args.suite)
    select = {k: v for k, v in (("keys", args.cell), ("methods", args.method)) if v}
    chosen = select_cells(cells, **select) if select else cells
    root = Path(args.out)
    runs = [("deterministic #1", True), ("deterministic #2", True), ("default", False)]
    results = []
    for i, (label, det) in enumerate(runs):  # each run reported as it ends (a call may be cut)
        records, seconds = run_once(args.suite, select, root / f"run{i}", det)
        results.append((label, records, seconds))
        print(f"{label}: {seconds:.1f} s, " + ", ".join(
            f"{r['cell']['method']} {r['status']}" for r in records.values()), flush=True)
    report, identical = [], True
    print(f"{'cell':44s} {'run':17s} {'status':7s} {'calib s':>8s} {'sample s':>9s}  paired_mse")
    for cell in chosen:
        recs = [r[1][cell.key] for r in results]
        for (label, _, _), rec in zip(results, recs):
            cs = rec.get("costs", {}).get("seconds", {})
            calib = sum(v for k, v in cs.items() if k in CALIB_STAGES)
            mse = rec.get("metrics", {}).get("paired_mse", {}).get("value")
            print(f"{cell.title()[:44]:44s} {label:17s} {rec['status']:7s} {calib:8.1f} "
                  f"{cs.get('sample', 0.0):9.1f}  {mse}")
        same = differences(recs[0], recs[1], limit=50)
        nondet = differences(recs[0], recs[2], limit=50)
        identical &= not same and recs[0]["status"] == "ok"
        print(f"  deterministic runs identical: {not same} ({len(same)} fields differ); "
              f"default run differs in {len(nondet)} fields")
        for d in same[:10]:
            print("    ", d)
        report.append({"cell": cell.title(), "key": cell.key, "identical": not same,
                       "differences": same[:50], "default_differences": nondet[:50],
                       "runs": [{"label": lb, "status": r["status"], "metrics": r["metrics"],
                                 "numerics": r.get("numerics"), "costs": r.get("costs")}
                                for (lb, _, _), r in zip(results, recs)]})
    walls = {label: s for label, _, s in results}
    ratio = walls["deterministic #1"] / walls["default"]
    print("wall-clock s: " + ", ".join(f"{k} {v:.1f}" for k, v in walls.items())
          + f"; deterministic / default = {ratio:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"cells": report, "wall_seconds": walls,
                                               "ratio": ratio}, indent=2, default=str))
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
