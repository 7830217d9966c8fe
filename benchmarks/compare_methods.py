"""Method A versus method B in one suite output: paired per-sample error, FID-to-FP and
calibration cost, per bit-width, as a markdown table (and JSON with -o).

    python benchmarks/compare_methods.py results/cifar10-s --a gac --b qdiffusion

Needs the samples (the paired test runs over the same-seed samples of both cells and their FP
reference), so run it where the suite ran. Issue 4 points 7 and 8 are measured with it.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ptqbench.metrics.paired import paired_difference, per_sample_mse
from ptqbench.metrics.significance import not_significantly_different
from ptqbench.store import Store

CALIB_STAGES = ("trajectories", "select", "quantize", "reconstruct")


def newest(records: list[dict]) -> dict[tuple, dict]:
    out: dict[tuple, dict] = {}
    for r in sorted(records, key=lambda r: r.get("finished") or ""):
        if r.get("status") == "ok":
            out[(r["cell"]["bits"], r["cell"]["method"])] = r
    return out


def calibration_seconds(rec: dict) -> dict:
    """Per-stage calibration seconds, from the run that calibrated (it may be an earlier run)."""
    costs = (rec.get("costs_calibration_reused") or {}).get("seconds") or rec["costs"]["seconds"]
    out = {k: costs.get(k, 0.0) for k in CALIB_STAGES}
    out["total"] = round(sum(out.values()), 3)
    return out


def gac_summary(rec: dict) -> dict:
    blocks = (rec.get("weighting_state") or {}).get("blocks") or {}
    if not blocks:
        return {}
    return {"blocks": len(blocks),
            "weight_min": min(b["weight_min"] for b in blocks.values()),
            "weight_max": max(b["weight_max"] for b in blocks.values()),
            "meta_steps": sum(b["meta_steps"] for b in blocks.values()),
            "meta_seconds": round(sum(b.get("meta_seconds") or 0.0 for b in blocks.values()), 2),
            "cuda_graph": sorted({str(b.get("cuda_graph")) for b in blocks.values()})}


def compare(folder: Path, a: str, b: str) -> list[dict]:
    store = Store(folder)
    recs = newest(list(store.records()))
    rows = []
    for bits in sorted({k[0] for k in recs if k[1] == a}):
        ra, rb = recs.get((bits, a)), recs.get((bits, b))
        if rb is None:
            continue
        n = int(ra["num_samples"])
        row = {"bits": bits, "a": a, "b": b, "n": n}
        fp = store.load_samples(ra["fp_gen_key"], n)
        sa, sb = store.load_samples(ra["gen_key"], n), store.load_samples(rb["gen_key"], n)
        if fp is not None and sa is not None and sb is not None and \
                ra["fp_gen_key"] == rb["fp_gen_key"]:
            fp_t = torch.from_numpy(fp)
            ma = per_sample_mse(torch.from_numpy(sa), fp_t).numpy()
            mb = per_sample_mse(torch.from_numpy(sb), fp_t).numpy()
            d, lo, hi = paired_difference(ma, mb)
            row.update(paired_mse_a=float(ma.mean()), paired_mse_b=float(mb.mean()),
                       paired_mse_diff=d, diff_lo=lo, diff_hi=hi,
                       paired_significant=not (lo <= 0.0 <= hi))
        for metric in ("fid_to_fp", "fid", "sfid"):
            va, vb = ra["metrics"].get(metric), rb["metrics"].get(metric)
            if va and vb:
                row[f"{metric}_a"], row[f"{metric}_b"] = va, vb
                row[f"{metric}_significant"] = not not_significantly_different(va, vb)
        ca, cb = calibration_seconds(ra), calibration_seconds(rb)
        row.update(calib_a=ca, calib_b=cb,
                   calib_ratio=round(ca["total"] / cb["total"], 3) if cb["total"] else None,
                   weighting_a=gac_summary(ra), device=ra.get("host", {}).get("gpu"))
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    def ci(v):
        lo_hi = v.get("ci")
        return f"{v['value']:.3f} [{lo_hi[0]:.3f}, {lo_hi[1]:.3f}]" if lo_hi else f"{v['value']:.3f}"

    out = ["| bits | paired MSE a | paired MSE b | a - b [95% CI] | significant | "
           "FID-to-FP a | FID-to-FP b | significant | calib s a | calib s b | ratio |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append("| {bits} | {pa} | {pb} | {d} | {ps} | {fa} | {fb} | {fs} | {ca} | {cb} | "
                   "{ratio} |".format(
                       bits=r["bits"],
                       pa=f"{r['paired_mse_a']:.3e}" if "paired_mse_a" in r else "n/a",
                       pb=f"{r['paired_mse_b']:.3e}" if "paired_mse_b" in r else "n/a",
                       d=(f"{r['paired_mse_diff']:.2e} [{r['diff_lo']:.2e}, {r['diff_hi']:.2e}]"
                          if "paired_mse_diff" in r else "n/a"),
                       ps=r.get("paired_significant", "n/a"),
                       fa=ci(r["fid_to_fp_a"]) if "fid_to_fp_a" in r else "n/a",
                       fb=ci(r["fid_to_fp_b"]) if "fid_to_fp_b" in r else "n/a",
                       fs=r.get("fid_to_fp_significant", "n/a"),
                       ca=r["calib_a"]["total"], cb=r["calib_b"]["total"], ratio=r["calib_ratio"]))
    return "\n".join(out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("folder", type=Path)
    p.add_argument("--a", default="gac")
    p.add_argument("--b", default="qdiffusion")
    p.add_argument("-o", "--output", type=Path, help="also write the rows as JSON here")
    args = p.parse_args(argv)
    rows = compare(args.folder, args.a, args.b)
    if not rows:
        raise SystemExit(f"no bit-width has finished cells of both {args.a} and {args.b}")
    print(markdown(rows))
    for r in rows:
        print(f"{r['bits']}: calibration seconds {args.a} {r['calib_a']}, {args.b} {r['calib_b']}; "
              f"{args.a} weighting {r['weighting_a']}")
    if args.output:
        args.output.write_text(json.dumps(rows, indent=2, default=str))


if __name__ == "__main__":
    main()
