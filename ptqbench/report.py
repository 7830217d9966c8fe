"""Leaderboards from a results folder: records -> pandas -> terminal / markdown / CSV / HTML.

This module builds the leaderboard frame; ``ptqbench.reporting`` renders it (numbers, the
terminal layout that fits the window, plots, the HTML page)."""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Iterable, Optional

import pandas as pd
import torch

from .errors import PtqbenchError
from .metrics.significance import not_significantly_different, seed_interval
from .store import Store

KEYS = ["model", "sampler", "bits", "method"]
#: preferred sort metric, first present wins; direction comes from the records
SORT_PREFERENCE = ["fid", "fid_to_fp", "sfid", "paired_mse"]
#: metrics computed per sample against the FP samples: rows are compared by a paired test
PAIRED_METRICS = ("paired_mse", "paired_psnr")
METRIC_ORDER = ["fid", "fid_to_fp", "sfid", "kid", "is", "precision", "recall", "paired_mse",
                "paired_psnr"]


def bits_order(label: str) -> tuple:
    """Sort key of a bit-width, high to low precision as a user reads them: FP, then weight
    bits descending; at the same weight bits, quantized activations (8, 6, 4 ...) come before
    weight-only quantization (A16/A32): FP, W8A8, W4A8, W4A4, W4A32. Unknown labels go last."""
    from .quant.bits import FULL_PRECISION

    if str(label).upper() == "FP":
        return (0,)
    m = re.match(r"^W(\d+)A(\d+)$", str(label).strip().upper())
    if not m:
        return (2, str(label))
    w, a = int(m.group(1)), int(m.group(2))
    return (1, -w, a in FULL_PRECISION, -a)


def load_records(folder: str | Path) -> list[dict]:
    folder = Path(folder)
    if not folder.exists():
        raise PtqbenchError(f"results folder not found: {folder}")
    root = folder.parent if folder.name == "records" else folder
    records = list(Store(root).records())
    if not records:
        raise PtqbenchError(f"no records under {root / 'records'}: run a suite first")
    for r in records:
        r["_root"] = str(root)  # where the samples of paired tests are
    return records


def records_frame(records: Iterable[dict]) -> pd.DataFrame:
    """One row per record: the cell, status, costs and every metric's value and CI."""
    rows = []
    for r in records:
        row = dict(r["cell"])
        row["status"] = r.get("status")
        row["error"] = (r.get("error") or {}).get("message")
        # A cell resumed after its calibration finished in an earlier run reuses that run's
        # quantized model; its cost is this run's stages plus the calibration it reused.
        reused = r.get("costs_calibration_reused") or {}
        total = (r.get("costs") or {}).get("total_seconds")
        row["seconds"] = None if total is None else total + (reused.get("total_seconds") or 0.0)
        calib = {**(r.get("costs") or {}).get("seconds", {}), **(reused.get("seconds") or {})}
        row["calibration_seconds"] = sum(v for k, v in calib.items()
                                         if k in ("trajectories", "select", "quantize", "reconstruct"))
        row["num_samples"] = r.get("num_samples")
        row["finished"] = r.get("finished") or ""
        row["_root"], row["_gen"], row["_fp_gen"] = r.get("_root"), r.get("gen_key"), r.get("fp_gen_key")
        for name, v in (r.get("metrics") or {}).items():
            row[name] = v.get("value")
            ci = v.get("ci")
            row[f"{name}__lo"], row[f"{name}__hi"] = (ci if ci else (None, None))
            row[f"{name}__hib"] = v.get("higher_is_better")
            if v.get("value") is None and v.get("unavailable"):
                row[f"{name}__why"] = v["unavailable"]
        rows.append(row)
    return pd.DataFrame(rows)


def metric_names(df: pd.DataFrame) -> list[str]:
    names = [c for c in df.columns if f"{c}__lo" in df.columns]
    return sorted(names, key=lambda n: (METRIC_ORDER.index(n) if n in METRIC_ORDER else 99, n))


def shown_metrics(board: pd.DataFrame, chosen: Optional[Iterable[str]] = None) -> list[str]:
    """The metric columns to show, in order: ``chosen`` as given (``--metrics``), else the
    metric the board is ranked by first, then the others in METRIC_ORDER. Metrics with no
    value in any row are left out."""
    available = [m for m in metric_names(board) if board[m].notna().any()]
    if chosen:
        chosen = [c.strip().replace("-", "_") for c in chosen if c.strip()]
        unknown = [c for c in chosen if c not in metric_names(board)]
        if unknown:
            raise PtqbenchError(f"--metrics: no metric {', '.join(map(repr, unknown))} in these "
                                f"records; metrics here: {', '.join(metric_names(board))}")
        return list(dict.fromkeys(chosen))
    sort = board.attrs.get("sort")
    return ([sort] if sort in available else []) + [m for m in available if m != sort]


def leaderboard(df: pd.DataFrame, models=None, bits=None, methods=None,
                sort: Optional[str] = None) -> pd.DataFrame:
    """One row per (model, sampler, bits, method) over finished cells. Several seeds are
    averaged and their interval is the 95% t-interval of that mean across seeds (calibration and
    sampling randomness together; never narrower than the per-seed intervals; see
    :func:`ptqbench.metrics.significance.seed_interval`). Per (model, sampler) the FP reference row
    comes first, then each bit-width's rows sorted by the sort metric; ``same_as_best`` marks
    rows not significantly different from the best row of their bit-width (95% intervals,
    rule in ptqbench.metrics.significance)."""
    ok = df[df["status"] == "ok"].copy() if "status" in df else df.copy()
    # a method redefined in the suite leaves its older records in the folder: the newest record
    # of each (model, sampler, bits, method, seed) is the one that counts
    if "finished" in ok:
        ok = ok.sort_values("finished").drop_duplicates(KEYS + ["seed"], keep="last")
    for col, allowed in (("model", models), ("bits", bits), ("method", methods)):
        if allowed:
            ok = ok[ok[col].isin(list(allowed)) | ((col == "bits") & (ok["method"] == "fp"))]
    if ok.empty:
        return ok
    metrics = metric_names(ok)
    agg = {m: "mean" for m in metrics}
    for m in metrics:
        agg[f"{m}__lo"] = "mean"
        agg[f"{m}__hi"] = "mean"
        agg[f"{m}__hib"] = "first"
    agg.update({"seconds": "mean", "calibration_seconds": "mean", "seed": "count",
                "num_samples": "first", "_root": "first", "_gen": "first", "_fp_gen": "first"})
    board = ok.groupby(KEYS, dropna=False).agg(agg).reset_index().rename(columns={"seed": "seeds"})
    _seed_intervals(ok, board, metrics)
    sort = sort or next((m for m in SORT_PREFERENCE if m in metrics), None)
    board["same_as_best"] = False
    if sort is None:
        return board.sort_values(KEYS)
    if sort not in metrics:
        raise PtqbenchError(f"cannot sort by {sort!r}; metrics here: {', '.join(metrics)}")
    higher = bool(board[f"{sort}__hib"].dropna().iloc[0]) if board[f"{sort}__hib"].notna().any() else False
    parts = []
    for (model, sampler), block in board.groupby(["model", "sampler"], dropna=False, sort=True):
        ref = block[block["method"] == "fp"].copy()
        ref["bits"] = "FP"
        ref["best"] = False
        parts.append(ref)  # the reference row leads its model and sampler
        quant = block[block["method"] != "fp"]
        for b in sorted(quant["bits"].unique(), key=bits_order):
            group = quant[quant["bits"] == b].sort_values(sort, ascending=not higher,
                                                          na_position="last")
            best = group.iloc[0]
            group["best"] = [i == group.index[0] and pd.notna(best[sort]) for i in group.index]
            paired = _paired_marks(group, sort) if sort in PAIRED_METRICS else None
            group["significance"] = "paired" if paired is not None else "ci"
            group["same_as_best"] = paired if paired is not None else [
                i != group.index[0] and _overlap(row, best, sort) for i, row in group.iterrows()]
            parts.append(group)
    out = pd.concat(parts).reset_index(drop=True)
    out.attrs["sort"] = sort  # the renderers name the metric the marks refer to
    return out


def _seed_intervals(ok: pd.DataFrame, board: pd.DataFrame, metrics: list[str]) -> None:
    """Replace the averaged per-seed intervals of multi-seed rows by the across-seed interval."""
    if not (board["seeds"] > 1).any():
        return
    groups = ok.groupby(KEYS, dropna=False)
    for i, row in board[board["seeds"] > 1].iterrows():
        cells = groups.get_group(tuple(row[k] for k in KEYS))
        for m in metrics:
            values = cells[m].dropna()
            if len(values) < 2:
                continue
            widths = ((cells[f"{m}__hi"] - cells[f"{m}__lo"]) / 2).dropna()
            lo, hi = seed_interval([float(v) for v in values],
                                   float(widths.mean()) if len(widths) else 0.0)
            board.at[i, f"{m}__lo"], board.at[i, f"{m}__hi"] = lo, hi


def _paired_marks(group: pd.DataFrame, metric: str) -> Optional[list[bool]]:
    """For a paired metric: is each row's per-sample difference from the best row's not
    significant (95% bootstrap interval of the mean difference contains 0)? None when the test
    cannot be made (several seeds, a different FP reference, samples not in the folder)."""
    import numpy as np

    from .metrics.paired import paired_difference, per_sample_mse, psnr_from_mse

    if (group["seeds"] != 1).any() or group["_gen"].isna().any() or group["_fp_gen"].nunique() != 1:
        return None
    store = Store(group["_root"].iloc[0])
    n = int(group["num_samples"].iloc[0])
    fp = store.load_samples(group["_fp_gen"].iloc[0], n)
    if fp is None:
        return None
    fp_t = torch.from_numpy(fp)
    per = []
    for gen in group["_gen"]:
        samples = store.load_samples(gen, n)
        if samples is None:
            return None
        mse = per_sample_mse(torch.from_numpy(samples), fp_t)
        per.append((mse if metric == "paired_mse" else psnr_from_mse(mse, fp[0].size)).numpy())
    marks = [False]
    for values in per[1:]:
        _, lo, hi = paired_difference(values, per[0])
        marks.append(bool(lo <= 0.0 <= hi))
    return marks


def _overlap(row, best, metric: str) -> bool:
    """Not significantly different from the best row (rule: ptqbench.metrics.significance)."""
    return not_significantly_different(_value_dict(row, metric), _value_dict(best, metric))


def _value_dict(row, metric: str) -> dict:
    lo, hi = row.get(f"{metric}__lo"), row.get(f"{metric}__hi")
    ci = None if lo is None or hi is None or pd.isna(lo) or pd.isna(hi) else [lo, hi]
    v = row.get(metric)
    return {"value": None if v is None or pd.isna(v) else float(v), "ci": ci}


def _fmt(row, metric: str) -> str:
    v = row.get(metric)
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    lo, hi = row.get(f"{metric}__lo"), row.get(f"{metric}__hi")
    if lo is None or hi is None or (isinstance(lo, float) and math.isnan(lo)):
        return _num(v)
    return f"{_num(v)} ± {_num((hi - lo) / 2, 2)}"


def _num(x: float, significant: int = 4) -> str:
    """Significant digits without exponent for the usual ranges (FID 12.34, MSE 0.01234)."""
    if x == 0:
        return "0"
    if 1e-4 <= abs(x) < 1e5:
        digits = max(0, significant - 1 - int(math.floor(math.log10(abs(x)))))
        return f"{x:.{digits}f}"
    return f"{x:.3e}"


def display_table(board: pd.DataFrame, compact: bool = False,
                  metrics: Optional[list[str]] = None) -> tuple[list[str], list[list[str]]]:
    """Header and formatted rows of the markdown output. ``compact`` drops the columns
    that are the same on every row (the caller names them in the title); ``metrics`` chooses
    and orders the metric columns (default: all)."""
    metrics = metrics or metric_names(board)
    keys = [k for k in KEYS if not (compact and k in constant_keys(board))]
    show_seeds = not compact or board["seeds"].nunique() > 1
    header = keys + metrics + (["seeds"] if show_seeds else []) + ["n", "time (s)", "≈best"]
    rows = []
    for _, r in board.iterrows():
        rows.append([str(r[k]) for k in keys] + [_fmt(r, m) for m in metrics]
                    + ([str(int(r["seeds"]))] if show_seeds else []) + [
            str(int(r["num_samples"])) if pd.notna(r["num_samples"]) else "",
            f"{r['seconds']:.1f}" if pd.notna(r["seconds"]) else "",
            "★" if flag(r, "best") else "≈" if flag(r, "same_as_best") else ""])
    return header, rows


def flag(row, name: str) -> bool:
    """A boolean column of a leaderboard row; absent or missing reads as False."""
    v = row.get(name)
    return False if v is None or (not isinstance(v, str) and pd.isna(v)) else bool(v)


def constant_keys(board: pd.DataFrame) -> list[str]:
    return [k for k in ("model", "sampler") if board[k].nunique() == 1]


def to_markdown(board: pd.DataFrame, metrics: Optional[list[str]] = None) -> str:
    header, rows = display_table(board, metrics=metrics)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    note = ("\n± is the half-width of the 95% confidence interval (one seed: over samples; "
            "several seeds: t-interval of the mean across seeds, which covers calibration "
            "randomness too); ★ marks the best row of its model, sampler and bit-width, "
            "≈ the rows not significantly different from it "
            "(|a - b| <= sqrt(h_a^2 + h_b^2); for paired metrics a paired bootstrap over the "
            "samples, which share seeds).\n")
    return "\n".join(lines) + "\n" + note


def to_csv(board: pd.DataFrame, metrics: Optional[list[str]] = None) -> str:
    metrics = metrics or metric_names(board)
    cols = KEYS + [c for m in metrics for c in (m, f"{m}__lo", f"{m}__hi")] + [
        "seeds", "num_samples", "seconds", "calibration_seconds", "best", "same_as_best"]
    out = board[[c for c in cols if c in board.columns]].rename(
        columns=lambda c: c.replace("__lo", "_ci_low").replace("__hi", "_ci_high"))
    return out.to_csv(index=False)


def print_rich(board: pd.DataFrame, console=None, title: str = "ptqbench leaderboard",
               metrics: Optional[list[str]] = None) -> None:
    """The leaderboard in the terminal, laid out to fit the console's width without cutting a
    value (see :mod:`ptqbench.reporting.terminal`)."""
    from rich.console import Console

    from .reporting.terminal import print_leaderboard

    print_leaderboard(board, console or Console(), title=title, metrics=metrics)


def failed_cells(df: pd.DataFrame) -> pd.DataFrame:
    if "status" not in df:
        return df.iloc[0:0]
    return df[df["status"] != "ok"][KEYS + ["seed", "error"]]


def failed_cell_lines(df: pd.DataFrame, models=None, bits=None, methods=None) -> list[str]:
    """One line per failed cell (matching the filters): the cell, then its record's reason."""
    failed = failed_cells(df)
    lines = []
    for _, r in failed.iterrows():
        if ((models and r["model"] not in models) or (bits and r["bits"] not in bits)
                or (methods and r["method"] not in methods)):
            continue
        reason = r["error"] if isinstance(r["error"], str) and r["error"] else "no reason recorded"
        lines.append(f"{r['model']} | {r['sampler']} | {r['bits']} | {r['method']} | "
                     f"seed {r['seed']}: {reason}")
    return lines


def plot_metric(board: pd.DataFrame, metric: str, path: str | Path) -> Path:
    """Bar chart of ``metric`` by method, one group of bars per bit-width, 95% CI as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    if metric not in board.columns:
        raise PtqbenchError(f"cannot plot {metric!r}; metrics here: {', '.join(metric_names(board))}")
    quant = board[board["method"] != "fp"]
    bits = sorted(quant["bits"].unique(), key=bits_order)
    methods = list(dict.fromkeys(quant.sort_values("method")["method"]))
    width = 0.8 / max(len(methods), 1)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 + 0.6 * len(bits) * max(len(methods), 1)), 3.6))
    for j, method in enumerate(methods):
        vals, errs = [], [[], []]
        for b in bits:
            row = quant[(quant["bits"] == b) & (quant["method"] == method)]
            v = row[metric].iloc[0] if len(row) else np.nan
            lo = row[f"{metric}__lo"].iloc[0] if len(row) else np.nan
            hi = row[f"{metric}__hi"].iloc[0] if len(row) else np.nan
            vals.append(v)
            errs[0].append(0 if pd.isna(lo) else v - lo)
            errs[1].append(0 if pd.isna(hi) else hi - v)
        ax.bar(np.arange(len(bits)) + (j - (len(methods) - 1) / 2) * width, vals, width,
               yerr=errs, capsize=3, label=method)
    fp = board[board["method"] == "fp"]
    if len(fp) and pd.notna(fp[metric].iloc[0]) and fp[metric].iloc[0] != 0:
        ax.axhline(fp[metric].iloc[0], color="k", ls="--", lw=1, label="fp")
    ax.set_xticks(np.arange(len(bits)), bits)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} by method and bit-width (95% CI)")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path
