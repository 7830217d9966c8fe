"""Issue 12's evidence tables from a results folder of gac and its uniform-weight baseline.

For each bit-width, per calibration seed: FID-to-FP (from ``benchmarks/fid_floor.py``'s JSON when
the GPU run could not compute it, else from the records) and paired MSE; the difference
``gac - BASELINE`` paired by seed with a 95% t-interval; and, per GAC cell, what its meta-learning
did: the share of the gradient-matching term in the meta-gradient (median over blocks), the
learned weights' range, meta-step time, non-finite steps. Writes the learned weights per sampler
step as a PNG (``ptqbench.reporting.plots.learned_weights_plot``).

    python benchmarks/gac_evidence.py RESULTS [--fid-json F] [--baseline qdiffusion]
        [--plot RESULTS/gac_weights_by_step.png] [--markdown OUT.md]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from ptqbench.metrics.significance import seed_interval
from ptqbench.reporting.plots import learned_weights_plot


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and half-width of the leaderboard's across-seed interval (nan for one value)."""
    if len(values) < 2:
        return statistics.fmean(values), float("nan")
    lo, hi = seed_interval(values)
    return (lo + hi) / 2, (hi - lo) / 2


def load_records(results: Path) -> list[dict]:
    return [json.loads(f.read_text()) for f in sorted((results / "records").glob("*.json"))]


def fid_to_fp_by_cell(records: list[dict], fid_json: Path | None) -> dict[tuple, float]:
    """(bits, method, seed) -> FID-to-FP: fid_floor.py's paired value, else the record's."""
    out = {}
    for r in records:
        v = (r.get("metrics") or {}).get("fid_to_fp", {}).get("value")
        if v is not None:
            c = r["cell"]
            out[(c["bits"], c["method"], c["seed"])] = v
    if fid_json is not None:
        for row in json.loads(fid_json.read_text())["cells"]:
            if "fid_to_fp" in row:
                out[(row["bits"], row["method"], row["seed"])] = row["fid_to_fp"]
    return out


def fmt(v: float, sci: bool) -> str:
    return f"{v:.2e}" if sci else f"{v:.2f}"


def block_summary(record: dict) -> dict:
    blocks = list(((record.get("weighting_state") or {}).get("blocks") or {}).values())
    med = lambda key: statistics.median(b[key] for b in blocks if b.get(key) is not None)
    return {"blocks": len(blocks),
            "gm_share_raw": med("gm_share_raw"), "gm_balance": med("gm_balance"),
            "weight_min": min(b["weight_min"] for b in blocks),
            "weight_max": max(b["weight_max"] for b in blocks),
            "meta_seconds": sum(b.get("meta_seconds", 0.0) for b in blocks),
            "not_finite": sum(b.get("meta_steps_not_finite", 0) for b in blocks),
            "reconstruct_seconds": record.get("costs", {}).get("seconds", {}).get("reconstruct")}


def tables(records: list[dict], fid: dict[tuple, float], baseline: str) -> str:
    ok = [r for r in records if r["status"] == "ok"]
    mse = {(r["cell"]["bits"], r["cell"]["method"], r["cell"]["seed"]):
           r["metrics"]["paired_mse"]["value"] for r in ok if "paired_mse" in r.get("metrics", {})}
    lines = []
    for bits in sorted({r["cell"]["bits"] for r in ok if r["cell"]["method"] == "gac"}):
        seeds = sorted({k[2] for k in mse if k[0] == bits and k[1] == "gac"}
                       & {k[2] for k in mse if k[0] == bits and k[1] == baseline})
        lines += [f"### {bits}: gac vs {baseline} ({len(seeds)} calibration seeds)", "",
                  "| method | " + " | ".join(f"seed {s}: FID-to-FP / paired MSE" for s in seeds)
                  + " | FID-to-FP mean | paired MSE mean |",
                  "|---|" + "---|" * (len(seeds) + 2)]
        for method in (baseline, "gac"):
            f = [fid.get((bits, method, s)) for s in seeds]
            m = [mse[(bits, method, s)] for s in seeds]
            cells = [f"{'-' if a is None else fmt(a, False)} / {fmt(b, True)}"
                     for a, b in zip(f, m)]
            fm = mean_ci([a for a in f if a is not None]) if all(a is not None for a in f) else None
            mm = mean_ci(m)
            lines.append(f"| {method} | " + " | ".join(cells) + " | "
                         + ("-" if fm is None else f"{fm[0]:.2f} ± {fm[1]:.2f}")
                         + f" | {mm[0]:.2e} ± {mm[1]:.1e} |")
        lines.append("")
        for name, table, sci in (("FID-to-FP", fid, False), ("paired MSE", mse, True)):
            if all((bits, m, s) in table for m in ("gac", baseline) for s in seeds):
                d = [table[(bits, "gac", s)] - table[(bits, baseline, s)] for s in seeds]
                m, h = mean_ci(d)
                each = ", ".join(f"{v:+.2e}" if sci else f"{v:+.2f}" for v in d)
                mean = f"{m:+.2e} ± {h:.1e}" if sci else f"{m:+.2f} ± {h:.2f}"
                lines.append(f"* gac − {baseline}, {name}, paired by seed: {each}; mean {mean}")
        lines += ["", "| gac seed | blocks | L_GM share raw (median) | balanced (median) | "
                  "weights min-max | meta s / reconstruct s | non-finite steps |",
                  "|---|---|---|---|---|---|---|"]
        gac = [r for r in ok if r["cell"]["method"] == "gac" and r["cell"]["bits"] == bits]
        for r in sorted(gac, key=lambda r: r["cell"]["seed"]):
            s = block_summary(r)
            lines.append(f"| {r['cell']['seed']} | {s['blocks']} | {s['gm_share_raw']:.2f} | "
                         f"{s['gm_balance']:.2f} | {s['weight_min']:.2f}-{s['weight_max']:.2f} | "
                         f"{s['meta_seconds']:.1f} / {s['reconstruct_seconds']:.1f} | "
                         f"{s['not_finite']} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", type=Path)
    ap.add_argument("--fid-json", type=Path, default=None,
                    help="benchmarks/fid_floor.py --json output for the same folder")
    ap.add_argument("--baseline", default="qdiffusion")
    ap.add_argument("--plot", type=Path, default=None)
    ap.add_argument("--markdown", type=Path, default=None)
    args = ap.parse_args(argv)
    records = load_records(args.results)
    if not records:
        print(f"{args.results}: no records", file=sys.stderr)
        return 1
    text = tables(records, fid_to_fp_by_cell(records, args.fid_json), args.baseline)
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")
    if args.plot:
        png = learned_weights_plot([r for r in records if r["status"] == "ok"])
        if png is None:
            print("no learned weights in these records: no plot", file=sys.stderr)
        else:
            args.plot.write_bytes(png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
