"""Every model family's tiny random instance end to end (fp, rtn, Q-Diffusion at W8A8, paired
error) on one device, then ``suites/paper.toml --dry-run``; prints a table, writes JSON.

    python benchmarks/family_smoke.py --device cuda -o /tmp/family-smoke

A family whose optional dependency is missing (Stable Diffusion without ``transformers``) is
reported as skipped with the reason.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_family(name: str, builder, kwargs: dict, sampler: str, device: str, work: Path) -> list:
    from ptqbench.families_testing import family_suite

    folder, plugin, options = builder(work / name / "model", **kwargs)
    suite = family_suite(work / name, folder, plugin, options, sampler=sampler)
    out = work / name / "out"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "ptqbench.cli", "run", str(suite), "-o", str(out),
                           "--device", device, "--no-progress"], capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    rows = []
    for p in sorted((out / "records").glob("*.json")):
        r = json.loads(p.read_text())
        mse = (r.get("metrics") or {}).get("paired_mse", {}).get("value")
        rows.append({"family": name, "method": r["cell"]["method"], "bits": r["cell"]["bits"],
                     "status": r["status"], "paired_mse": mse,
                     "error": (r.get("error") or {}).get("message"),
                     "units": len((r.get("reconstruction") or {}).get("blocks", [])),
                     "suite_seconds": round(seconds, 1)})
    if not rows:
        rows.append({"family": name, "method": "-", "bits": "-", "status": "failed",
                     "error": (proc.stderr or proc.stdout)[-600:], "suite_seconds": round(seconds, 1)})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("-o", "--output", type=Path, default=None)
    ap.add_argument("--family", action="append", help="only these families (default: all)")
    args = ap.parse_args()
    from ptqbench.families_testing import FAMILIES

    work = Path(tempfile.mkdtemp(prefix="family-smoke-"))
    rows = []
    for name, (builder, kwargs, sampler) in FAMILIES.items():
        if args.family and name not in args.family:
            continue
        if name == "stable-diffusion":
            try:
                import transformers  # noqa: F401
            except ImportError:
                rows.append({"family": name, "method": "-", "bits": "-", "status": "skipped",
                             "error": "transformers not installed (pip install 'ptqbench[sd]')"})
                continue
        rows.extend(run_family(name, builder, kwargs, sampler, args.device, work))
    print(f"{'family':26s} {'method':11s} {'bits':5s} {'status':8s} {'paired_mse':>12s} units  s")
    for r in rows:
        mse = "-" if r.get("paired_mse") is None else f"{r['paired_mse']:.3e}"
        print(f"{r['family']:26s} {r['method']:11s} {r['bits']:5s} {r['status']:8s} {mse:>12s} "
              f"{r.get('units', 0):5d} {r.get('suite_seconds', 0)}")
        if r.get("error") and r["status"] != "ok":
            print(f"    error: {r['error']}")
    dry = subprocess.run([sys.executable, "-m", "ptqbench.cli", "run",
                          str(REPO / "suites" / "paper.toml"), "--dry-run"],
                         capture_output=True, text=True)
    print(f"\nsuites/paper.toml --dry-run: exit {dry.returncode}")
    lines = dry.stdout.splitlines()
    print("\n".join(lines[:1] + [l for l in lines if l.startswith(("models and", "  model", "  fid",
                                                                   "  sfid", "  clip"))]))
    if dry.returncode != 0:
        print(dry.stderr[-2000:])
    if args.output is not None:
        args.output.mkdir(parents=True, exist_ok=True)
        (args.output / "family_smoke.json").write_text(json.dumps(
            {"rows": rows, "paper_dry_run": {"exit": dry.returncode, "stdout": dry.stdout}},
            indent=1))
    ok = all(r["status"] in ("ok", "skipped") for r in rows) and dry.returncode == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
