"""``ptqbench report --format html``: one self-contained page (styles inline, plots embedded as
PNG data URIs, no script, nothing fetched at view time). Per (model, sampler): the leaderboard
with intervals and significance marks, quality vs bit-width, quality vs calibration cost with the
Pareto front, per-step error between FP and quantized trajectories, learned weights per sampler
step, and the coverage manifest of every method."""
from __future__ import annotations

import base64
import html
import time
from collections import Counter
from pathlib import Path
from typing import Optional

import pandas as pd

from ..report import KEYS, bits_order, flag, shown_metrics
from . import plots
from .numbers import column_exponent, exponent_label, format_cell
from .terminal import BEST, SAME

STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px auto;
       max-width: 1200px; padding: 0 16px; color: #1d1d1f; }
h1 { font-size: 22px; } h2 { font-size: 18px; border-bottom: 1px solid #ccc; margin-top: 36px; }
h3 { font-size: 15px; margin: 22px 0 6px; }
.meta, .note { color: #555; font-size: 12.5px; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; margin: 6px 0; }
th, td { padding: 3px 10px; text-align: right; white-space: nowrap; }
th { border-bottom: 2px solid #333; vertical-align: bottom; }
th.key, td.key { text-align: left; }
tbody + tbody tr:first-child td { border-top: 1px solid #999; }
tr.fp td { font-weight: 600; background: #f4f4f6; }
tr.best td { font-weight: 600; background: #eaf5ea; }
tr.same td { background: #f5faf5; }
td.mark { text-align: center; }
.hw { color: #666; }
img.plot { max-width: 100%; border: 1px solid #e3e3e3; margin: 4px 0; }
table.coverage td, table.coverage th { font-size: 12.5px; }
td.wrap { white-space: normal; text-align: left; max-width: 420px; }
"""


def _e(x) -> str:
    return html.escape(str(x))


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img class="plot" alt="{_e(alt)}" src="data:image/png;base64,{data}">'


def _cell_records(records: list[dict], board: pd.DataFrame) -> list[dict]:
    """The finished records behind the rows of ``board`` (newest per cell and seed)."""
    rows = {tuple(r[k] for k in KEYS) for _, r in board.iterrows()}
    newest: dict[tuple, dict] = {}
    for r in records:
        if r.get("status") != "ok":
            continue
        c = r["cell"]
        key = (c["model"], c["sampler"], "FP" if c["method"] == "fp" else c["bits"], c["method"])
        if key not in rows:
            continue
        seeded = key + (c.get("seed"),)
        if seeded not in newest or (r.get("finished") or "") >= (newest[seeded].get("finished") or ""):
            newest[seeded] = r
    return list(newest.values())


def leaderboard_table(rows: pd.DataFrame, metrics: list[str]) -> str:
    exps = {m: column_exponent(rows[m].tolist()) for m in metrics}
    head = ['<th class="key">bits</th>', '<th class="key">method</th>', "<th></th>"]
    for m in metrics:
        label = exponent_label(exps[m])
        head.append(f"<th>{_e(m)}{'<br>' + _e(label) if label else ''}</th>")
    head += ["<th>seeds</th>", "<th>n</th>", "<th>calibration (s)</th>", "<th>time (s)</th>"]
    bodies = []
    for _, group in rows.groupby("bits", sort=False):
        trs = []
        for _, r in group.iterrows():
            best, same = flag(r, "best"), flag(r, "same_as_best")
            cls = "fp" if r["method"] == "fp" else ("best" if best else "same" if same else "")
            mark = BEST if best else SAME if same else ""
            tds = [f'<td class="key">{_e(r["bits"])}</td>', f'<td class="key">{_e(r["method"])}</td>',
                   f'<td class="mark">{mark}</td>']
            for m in metrics:
                c = format_cell(r.get(m), r.get(f"{m}__lo"), r.get(f"{m}__hi"), exps[m])
                hw = f' <span class="hw">± {_e(c.half_width)}</span>' if c.half_width else ""
                tds.append(f"<td>{_e(c.value)}{hw}</td>")
            for col, fmt in (("seeds", "{:.0f}"), ("num_samples", "{:.0f}"),
                             ("calibration_seconds", "{:.1f}"), ("seconds", "{:.1f}")):
                v = r.get(col)
                tds.append(f"<td>{'' if v is None or pd.isna(v) or (col == 'calibration_seconds' and r['method'] == 'fp') else fmt.format(v)}</td>")
            trs.append(f'<tr class="{cls}">' + "".join(tds) + "</tr>")
        bodies.append("<tbody>" + "".join(trs) + "</tbody>")
    return ('<div class="scroll"><table class="board"><thead><tr>' + "".join(head)
            + "</tr></thead>" + "".join(bodies) + "</table></div>")


def _coverage_summary(cov: dict) -> dict[str, str]:
    layers = cov.get("quantized_layers") or []
    counts = cov.get("counts") or {}
    wbits = Counter(f"W{(l.get('weight') or {}).get('bits')}" for l in layers if l.get("weight"))
    abits = Counter(f"A{(l.get('input') or {}).get('bits')}" for l in layers if l.get("input"))
    params = Counter((l.get("input") or {}).get("params") for l in layers if l.get("input"))
    gran = Counter((l.get("weight") or {}).get("granularity") for l in layers if l.get("weight"))
    fp_types = Counter(m.get("type") for m in cov.get("full_precision_modules") or [])

    def join(c: Counter) -> str:
        return ", ".join(f"{k} ×{v}" for k, v in c.most_common() if k is not None) or "none"

    return {
        "quantized layers": str(counts.get("quantized_layers", len(layers))),
        "weights": join(wbits) + (f" ({join(gran)})" if gran else ""),
        "activations": join(abits) + (f" ({join(params)} params)" if params else ""),
        "attention matmuls": f"{counts.get('quantized_matmuls', 0)} quantized, "
                             f"{counts.get('fp_attention_matmuls', 0)} FP",
        "weight params": f"{counts.get('weight_params_quantized', 0):,} quantized, "
                         f"{counts.get('weight_params_fp', 0):,} FP",
        "FP modules": join(fp_types),
        "FP ops": "; ".join(cov.get("full_precision_ops") or []) or "none",
    }


def coverage_table(records: list[dict]) -> str:
    seen: dict[tuple[str, str], dict] = {}
    for r in sorted(records, key=lambda r: (bits_order(r["cell"]["bits"]), r["cell"]["method"])):
        if r["cell"]["method"] != "fp" and r.get("coverage"):
            seen.setdefault((r["cell"]["bits"], r["cell"]["method"]), r["coverage"])
    if not seen:
        return '<p class="note">No coverage manifest in these records.</p>'
    summaries = {k: _coverage_summary(v) for k, v in seen.items()}
    cols = list(next(iter(summaries.values())))
    shared = ""
    ops = {s["FP ops"] for s in summaries.values()}
    if len(ops) == 1:  # usually the same for every method: say it once
        cols.remove("FP ops")
        shared = f'<p class="note">Kept in full precision by every method here: {_e(ops.pop())}.</p>'

    head = '<th class="key">bits</th><th class="key">method</th>' + "".join(
        f'<th class="key">{_e(c)}</th>' for c in cols)
    trs = []
    for (b, m), s in summaries.items():
        trs.append(f'<tr><td class="key">{_e(b)}</td><td class="key">{_e(m)}</td>' + "".join(
            f'<td class="wrap">{_e(s[c])}</td>' for c in cols) + "</tr>")
    return ('<div class="scroll"><table class="coverage"><thead><tr>' + head + "</tr></thead><tbody>"
            + "".join(trs) + "</tbody></table></div>" + shared)


def block_section(rows: pd.DataFrame, records: list[dict], metrics: list[str], sort: Optional[str],
                  anchor: str) -> str:
    model, sampler = rows["model"].iloc[0], rows["sampler"].iloc[0]
    n = sorted({int(v) for v in rows["num_samples"].dropna()})
    seeds = sorted({int(v) for v in rows["seeds"].dropna()})
    out = [f'<section id="{_e(anchor)}"><h2>{_e(model)} · {_e(sampler)}</h2>',
           f'<p class="meta">{"/".join(map(str, n))} samples per cell; '
           f'{"/".join(map(str, seeds))} seed(s) per row</p>',
           "<h3>Leaderboard</h3>", leaderboard_table(rows, metrics),
           f'<p class="note">± half-width of the 95% confidence interval (several seeds: '
           f't-interval of the mean across seeds). {BEST} best row of its bit-width'
           + (f" by {_e(sort)}" if sort else "") + f"; {SAME} not significantly different from it "
           f"(|a − b| ≤ √(h_a² + h_b²); paired metrics: paired bootstrap over the shared seeds). "
           f"Calibration: trajectories, selection, quantization and reconstruction; time: the "
           f"whole cell.</p>"]
    plot_metrics = [m for m in metrics if rows[m].notna().any()][:3]
    if plot_metrics:
        out += ["<h3>Quality vs bit-width</h3>",
                _img(plots.quality_by_bits(rows, plot_metrics), "quality vs bit-width")]
    cost_metric = sort if sort in metrics else (plot_metrics[0] if plot_metrics else None)
    if cost_metric and (rows["method"] != "fp").any():
        out += ["<h3>Quality vs calibration cost (Pareto)</h3>",
                _img(plots.quality_vs_cost(rows, cost_metric), "quality vs calibration cost")]
    out.append("<h3>Error between FP and quantized trajectories per sampler step</h3>")
    traj = plots.trajectory_error_plot(records)
    out.append(_img(traj, "trajectory error per sampler step") if traj else
               '<p class="note">No record here has <code>trajectory_error</code> (records '
               "written before ptqbench recorded it, or FP only).</p>")
    weights = plots.learned_weights_plot(records)
    if weights:
        out += ["<h3>Learned weights per sampler step</h3>",
                _img(weights, "learned weights per sampler step")]
    out += ["<h3>Coverage manifest per method</h3>", coverage_table(records), "</section>"]
    return "\n".join(out)


def to_html(board: pd.DataFrame, records: list[dict], metrics: Optional[list[str]] = None,
            title: str = "ptqbench report", source: Optional[str] = None) -> str:
    from .. import __version__

    chosen = shown_metrics(board, metrics)
    sort = board.attrs.get("sort")
    finished = _cell_records(records, board)
    sections, toc = [], []
    for i, ((model, sampler), rows) in enumerate(board.groupby(["model", "sampler"], sort=False)):
        anchor = f"block-{i}"
        recs = [r for r in finished if r["cell"]["model"] == model and r["cell"]["sampler"] == sampler]
        ms = [m for m in chosen if metrics or rows[m].notna().any()]
        sections.append(block_section(rows, recs, ms, sort, anchor))
        toc.append(f'<li><a href="#{anchor}">{_e(model)} · {_e(sampler)}</a></li>')
    failed = [r for r in records if r.get("status") not in ("ok", None)]
    fail_html = ""
    if failed:
        items = "".join(f"<li>{_e(r['cell']['model'])} {_e(r['cell']['bits'])} "
                        f"{_e(r['cell']['method'])} seed {_e(r['cell'].get('seed'))}: "
                        f"{_e((r.get('error') or {}).get('message'))}</li>" for r in failed)
        fail_html = f"<h2>Failed cells ({len(failed)})</h2><ul>{items}</ul>"
    meta = (f"{len(finished)} finished records" + (f" from {_e(source)}" if source else "")
            + f"; ptqbench {_e(__version__)}; written {time.strftime('%Y-%m-%d %H:%M %Z')}")
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_e(title)}</title><style>{STYLE}</style></head><body>"
            f"<h1>{_e(title)}</h1><p class=\"meta\">{meta}</p><ul>{''.join(toc)}</ul>"
            + "\n".join(sections) + fail_html + "</body></html>\n")


def write_html_report(board: pd.DataFrame, records: list[dict], path: str | Path,
                      metrics: Optional[list[str]] = None, source=None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_html(board, records, metrics,
                            source=None if source is None else str(source)), encoding="utf-8")
    return path
