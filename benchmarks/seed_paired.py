"""Seed-paired comparison of methods in a results folder: per bit-width, each method's metric per
calibration seed, its mean with the leaderboard's across-seed interval, and the difference to a
baseline method paired by seed (mean ± 95% t-interval over seeds, and per seed).

    python benchmarks/seed_paired.py RESULTS [--baseline rtn] [--metric paired_mse]
        [--markdown OUT.md]

Methods are compared only on the seeds both have; cells that did not finish are left out.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

from ptqbench.metrics.significance import seed_interval


def metric_table(results: Path, metric: str) -> dict[str, dict[str, dict[int, float]]]:
    """bits -> method -> seed -> value of ``metric`` over the folder's finished records."""
    table: dict = defaultdict(lambda: defaultdict(dict))
    for f in sorted((results / "records").glob("*.json")):
        r = json.loads(f.read_text())
        value = (r.get("metrics") or {}).get(metric, {}).get("value")
        if r.get("status") == "ok" and value is not None and r["cell"]["bits"] != "FP":
            c = r["cell"]
            table[c["bits"]][c["method"]][int(c["seed"])] = float(value)
    return table


def mean_interval(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.4g}" if values else "n/a"
    lo, hi = seed_interval(values)
    return f"{(lo + hi) / 2:.4g} ± {(hi - lo) / 2:.2g}"


def render(table: dict, baseline: str, metric: str) -> str:
    lines = []
    for bits in sorted(table, reverse=True):
        methods = table[bits]
        seeds = sorted({s for per in methods.values() for s in per})
        lines += [f"## {bits}: {metric}", "",
                  "| method | " + " | ".join(f"seed {s}" for s in seeds) + " | across seeds |",
                  "|---" * (len(seeds) + 2) + "|"]
        for m in sorted(methods):
            per = methods[m]
            cells = [f"{per[s]:.4g}" if s in per else "" for s in seeds]
            lines.append(f"| {m} | " + " | ".join(cells) + f" | {mean_interval(list(per.values()))} |")
        base = methods.get(baseline)
        if base:
            lines += ["", f"Seed-paired difference to {baseline} (mean ± 95% t-interval; per seed):",
                      ""]
            for m in sorted(methods):
                if m == baseline:
                    continue
                common = sorted(set(methods[m]) & set(base))
                diffs = [methods[m][s] - base[s] for s in common]
                if not diffs:
                    continue
                per_seed = ", ".join(f"{d:+.3g}" for d in diffs)
                lines.append(f"* {m} − {baseline}: {mean_interval(diffs)} ({per_seed})")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", type=Path)
    ap.add_argument("--baseline", default="rtn")
    ap.add_argument("--metric", default="paired_mse")
    ap.add_argument("--markdown", type=Path)
    args = ap.parse_args(argv)
    table = metric_table(args.results, args.metric)
    if not table:
        print(f"{args.results}: no finished record with metric {args.metric}", file=sys.stderr)
        return 1
    text = render(table, args.baseline, args.metric)
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
