"""Figures of the HTML report, each returned as PNG bytes (embedded in the page, so the page
needs nothing at view time): quality vs bit-width, quality vs calibration cost (Pareto front),
per-step error between FP and quantized trajectories, learned weights per sampler step."""
from __future__ import annotations

import io
from collections import defaultdict
from typing import Optional

import numpy as np
import pandas as pd

from ..report import bits_order

MARKERS = "osD^vP*Xh<>"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    _plt().close(fig)
    return buf.getvalue()


def _colors(methods: list[str]) -> dict[str, tuple]:
    cmap = _plt().get_cmap("tab10")
    return {m: cmap(i % 10) for i, m in enumerate(methods)}


def _err(rows: pd.DataFrame, metric: str) -> np.ndarray:
    v = rows[metric].to_numpy(float)
    lo = rows[f"{metric}__lo"].to_numpy(float)
    hi = rows[f"{metric}__hi"].to_numpy(float)
    return np.nan_to_num(np.vstack([v - lo, hi - v]), nan=0.0).clip(min=0.0)


def quality_by_bits(board: pd.DataFrame, metrics: list[str]) -> bytes:
    """One panel per metric: each method's value (95% CI) at each bit-width, high precision
    left; the FP reference as a dashed line."""
    plt = _plt()
    quant = board[board["method"] != "fp"]
    bits = sorted(quant["bits"].unique(), key=bits_order)
    methods = sorted(quant["method"].unique())
    colors = _colors(methods)
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for j, method in enumerate(methods):
            rows = quant[quant["method"] == method].copy()
            rows["_x"] = [bits.index(b) for b in rows["bits"]]
            rows = rows.sort_values("_x")
            ax.errorbar(rows["_x"] + (j - len(methods) / 2) * 0.04, rows[metric],
                        yerr=_err(rows, metric), marker=MARKERS[j % len(MARKERS)], capsize=3,
                        color=colors[method], label=method)
        fp = board[board["method"] == "fp"][metric].dropna()
        if len(fp):
            ax.axhline(float(fp.iloc[0]), color="k", ls="--", lw=1, label="fp")
        ax.set_xticks(range(len(bits)), bits)
        ax.set_xlabel("bit-width (high to low precision)")
        ax.set_title(metric)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("quality vs bit-width (95% CI)", fontsize=10)
    return _png(fig)


def pareto_front(points: list[tuple[float, float]], higher_is_better: bool) -> list[int]:
    """Indices of the points no other point beats on both cost (lower) and quality, by cost."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0],
                                                      -points[i][1] if higher_is_better
                                                      else points[i][1]))
    front, best = [], None
    for i in order:
        q = points[i][1]
        if best is None or (q > best if higher_is_better else q < best):
            front.append(i)
            best = q
    return front


def quality_vs_cost(board: pd.DataFrame, metric: str) -> bytes:
    """Each (method, bit-width): calibration seconds (trajectories, selection, quantization,
    reconstruction) against ``metric``; the Pareto front of each bit-width as a line."""
    plt = _plt()
    quant = board[(board["method"] != "fp") & board[metric].notna()
                  & board["calibration_seconds"].notna()]
    methods = sorted(quant["method"].unique())
    bits = sorted(quant["bits"].unique(), key=bits_order)
    colors = _colors(methods)
    higher = bool(quant[f"{metric}__hib"].dropna().iloc[0]) if quant[f"{metric}__hib"].notna().any() else False
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for k, b in enumerate(bits):
        rows = quant[quant["bits"] == b]
        cost = rows["calibration_seconds"].clip(lower=1e-3).to_numpy(float)
        for (_, r), c in zip(rows.iterrows(), cost):
            ax.errorbar([c], [r[metric]], yerr=_err(rows.loc[[_]], metric),
                        marker=MARKERS[k % len(MARKERS)], color=colors[r["method"]], capsize=2,
                        ms=7, ls="none")
            ax.annotate(f"{r['method']} {b}", (c, r[metric]), fontsize=7,
                        xytext=(4, 3), textcoords="offset points")
        front = pareto_front(list(zip(cost, rows[metric].to_numpy(float))), higher)
        ax.plot(cost[front], rows[metric].to_numpy(float)[front], color="0.5", lw=1,
                ls=["-", "--", ":", "-."][k % 4], label=f"Pareto front {b}")
    fp = board[board["method"] == "fp"][metric].dropna()
    if len(fp):
        ax.axhline(float(fp.iloc[0]), color="k", ls="--", lw=1, label="fp")
    costs = quant["calibration_seconds"].clip(lower=1e-3)
    log = len(costs) > 1 and costs.max() / costs.min() > 20  # log only for a wide range
    if log:
        ax.set_xscale("log")
    ax.set_xlabel("calibration cost (s" + (", log scale)" if log else ")"))
    ax.set_ylabel(f"{metric} ({'higher' if higher else 'lower'} is better)")
    ax.set_title(f"{metric} vs calibration cost", fontsize=10)
    ax.legend(fontsize=7)
    return _png(fig)


def _by_cell(records: list[dict]) -> dict[tuple[str, str], list[dict]]:
    out: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in records:
        out[(r["cell"]["method"], r["cell"]["bits"])].append(r)
    return dict(sorted(out.items(), key=lambda kv: (bits_order(kv[0][1]), kv[0][0])))


def has_trajectory_error(records: list[dict]) -> bool:
    return any("x_mse" in (r.get("trajectory_error") or {}) for r in records)


def trajectory_error_plot(records: list[dict]) -> Optional[bytes]:
    """Mean squared difference between FP and quantized trajectories per sampler step (states
    x_t on the left, model outputs on the right; several seeds averaged)."""
    cells = {k: [r["trajectory_error"] for r in v if "x_mse" in (r.get("trajectory_error") or {})]
             for k, v in _by_cell(records).items()}
    cells = {k: v for k, v in cells.items() if v}
    if not cells:
        return None
    plt = _plt()
    colors = _colors(sorted({m for m, _ in cells}))
    bits = sorted({b for _, b in cells}, key=bits_order)
    styles = dict(zip(bits, ["-", "--", ":", "-."] * 4))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    from matplotlib.ticker import MaxNLocator

    for (method, b), errs in cells.items():
        for ax, key, first in zip(axes, ("x_mse", "out_mse"), (1, 0)):
            # x_t at step 0 is the shared x_T (error 0): the drift starts at step 1
            series = np.mean([e[key] for e in errs], axis=0)[first:]
            steps = np.arange(first, first + len(series))
            lo = np.mean([[c[0] for c in e[f"{key}_ci"]] for e in errs], axis=0)[first:]
            hi = np.mean([[c[1] for c in e[f"{key}_ci"]] for e in errs], axis=0)[first:]
            ax.plot(steps, series, ls=styles[b], color=colors[method], marker=".",
                    label=f"{method} {b}")
            ax.fill_between(steps, lo, hi, where=lo > 0, color=colors[method], alpha=0.15)
    n = sorted({e["num_samples"] for v in cells.values() for e in v})
    axes[0].set_title("x_t entering each step (drift; last: final sample)", fontsize=10)
    axes[1].set_title("model output at each step", fontsize=10)
    for ax in axes:
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("sampler step (0 = noisiest)")
        ax.set_ylabel("mean squared error")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"error between FP and quantized sampling of the same seeds "
                 f"({'/'.join(map(str, n))} paired samples, 95% CI)", fontsize=10)
    return _png(fig)


def learned_weights_by_step(records: list[dict]) -> dict[tuple[str, str], dict[int, list[float]]]:
    """Per (method, bits): the learned per-sample weight averaged by sampler step, one value per
    reconstructed block (and seed). Only weightings that report ``weight_by_step``."""
    out: dict[tuple[str, str], dict[int, list[float]]] = {}
    for key, recs in _by_cell(records).items():
        steps: dict[int, list[float]] = defaultdict(list)
        for r in recs:
            for block in ((r.get("weighting_state") or {}).get("blocks") or {}).values():
                for s, w in (block.get("weight_by_step") or {}).items():
                    steps[int(s)].append(float(w))
        if steps:
            out[key] = dict(sorted(steps.items()))
    return out


def learned_weights_plot(records: list[dict]) -> Optional[bytes]:
    """Mean learned weight per sampler step over blocks, with the range across blocks."""
    weights = learned_weights_by_step(records)
    if not weights:
        return None
    plt = _plt()
    colors = _colors(sorted({m for m, _ in weights}))
    bits = sorted({b for _, b in weights}, key=bits_order)
    styles = dict(zip(bits, ["-", "--", ":", "-."] * 4))
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for (method, b), steps in weights.items():
        x = np.array(list(steps))
        vals = [np.array(v) for v in steps.values()]
        ax.plot(x, [v.mean() for v in vals], marker="o", ms=3, color=colors[method],
                label=f"{method} {b}", ls=styles[b])
        ax.fill_between(x, [v.min() for v in vals], [v.max() for v in vals], color=colors[method],
                        alpha=0.12)
    ax.axhline(1.0, color="k", lw=0.8, ls=":", label="uniform")
    ax.set_xlabel("sampler step of the calibration sample (0 = noisiest)")
    ax.set_ylabel("weight (mean over blocks)")
    ax.set_title("learned calibration weights per sampler step (band: range over blocks)",
                 fontsize=10)
    ax.legend(fontsize=7)
    return _png(fig)
