"""The leaderboard in a terminal, fitted to its width without cutting a value.

Per (model, sampler) the columns that are the same on every row (model, sampler, sample count,
seeds) move to the title; bit-widths are grouped with a rule between groups; the best row of each
group is marked ``★`` and the rows not significantly different from it ``≈`` (characters, so the
marks survive output without colour). When the metrics do not fit side by side, the layout
stacks each value over its interval, then splits the metrics over several tables that repeat the
row labels; rich never has to cut a cell.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import pandas as pd
from rich import box
from rich.console import Console
from rich.table import Table

from ..report import flag, shown_metrics
from .numbers import column_exponent, exponent_label, format_cell

BEST, SAME = "★", "≈"


@dataclass
class Block:
    """One (model, sampler) part of the leaderboard, with what its tables need."""

    title: str
    rows: pd.DataFrame
    metrics: list[str]
    exponents: dict[str, int]
    extras: list[str]  # per-row columns after the metrics: seeds / n when they vary, time


def blocks(board: pd.DataFrame, metrics: Optional[list[str]] = None,
           title: str = "ptqbench leaderboard") -> list[Block]:
    out = []
    chosen = shown_metrics(board, metrics)
    for (model, sampler), rows in board.groupby(["model", "sampler"], sort=False, dropna=False):
        fixed = [f"{model}", f"{sampler}"]
        extras = []
        for col, one, many in (("num_samples", "sample", "samples"), ("seeds", "seed", "seeds")):
            vals = rows[col].dropna().unique()
            if len(vals) == 1:  # the same on every row: said once, in the title
                fixed.append(f"{int(vals[0])} {one if int(vals[0]) == 1 else many}")
            elif len(vals) > 1:
                extras.append(col)
        if rows["seconds"].notna().any():
            extras.append("seconds")
        ms = [m for m in chosen if m in rows and (metrics or rows[m].notna().any())]
        out.append(Block(title=f"{title}: {', '.join(fixed)}", rows=rows, metrics=ms,
                         exponents={m: column_exponent(rows[m].tolist()) for m in ms},
                         extras=extras))
    return out


def _mark(row) -> str:
    return BEST if flag(row, "best") else SAME if flag(row, "same_as_best") else ""


def _extra_cell(row, col: str) -> str:
    v = row.get(col)
    if v is None or pd.isna(v):
        return ""
    return f"{v:.0f}" if col == "seconds" and v >= 100 else (
        f"{v:.1f}" if col == "seconds" else str(int(v)))


EXTRA_HEADERS = {"num_samples": "n", "seeds": "seeds", "seconds": "time\n(s)"}


def build_table(block: Block, metrics: list[str], stacked: bool, extras: bool,
                title: Optional[str]) -> Table:
    table = Table(title=title, box=box.HORIZONTALS, show_edge=False, pad_edge=False,
                  title_justify="left", padding=(0, 1))
    table.add_column("bits", no_wrap=True)
    table.add_column("method", no_wrap=True)
    table.add_column("", no_wrap=True, min_width=1)  # ★ / ≈
    for m in metrics:
        label = exponent_label(block.exponents[m])
        table.add_column(m + (f"\n{label}" if label else ""), justify="right", no_wrap=True)
    extra_cols = block.extras if extras else []
    for col in extra_cols:
        table.add_column(EXTRA_HEADERS[col], justify="right", no_wrap=True)
    rows = list(block.rows.iterrows())
    for i, (_, r) in enumerate(rows):
        cells = [format_cell(r.get(m), r.get(f"{m}__lo"), r.get(f"{m}__hi"), block.exponents[m])
                 for m in metrics]
        last_of_group = i + 1 == len(rows) or rows[i + 1][1]["bits"] != r["bits"]
        table.add_row(str(r["bits"]), str(r["method"]), _mark(r),
                      *[c.stacked() if stacked else c.inline() for c in cells],
                      *[_extra_cell(r, c) for c in extra_cols],
                      style="bold" if r["method"] == "fp" or flag(r, "best") else None,
                      end_section=last_of_group)
    return table


def _width(console: Console, table: Table) -> int:
    """Natural width of ``table`` (measured as if the console were unbounded: rich clamps a
    measurement to the width it is given)."""
    return console.measure(table, options=console.options.update_width(100_000)).maximum


def layout(block: Block, console: Console) -> list[Table]:
    """The tables that show ``block`` within ``console.width``: one table with value ± interval
    inline, else stacked, else the metrics split over as few tables as fit (inline, else
    stacked); extra columns (time, n) ride on the last table or get one of their own."""
    width = console.width
    for stacked in (False, True):
        t = build_table(block, block.metrics, stacked, True, block.title)
        if _width(console, t) <= width:
            return [t]
    for stacked in (False, True):
        chunks: list[list[str]] = []
        for m in block.metrics:
            if chunks and _width(console, build_table(block, chunks[-1] + [m], stacked, False,
                                                      None)) <= width:
                chunks[-1].append(m)
            else:
                chunks.append([m])
        if all(_width(console, build_table(block, c, stacked, False, None)) <= width
               for c in chunks) or stacked:
            break
    tables = [build_table(block, c, stacked, False, None) for c in chunks]
    if block.extras:
        with_extras = build_table(block, chunks[-1], stacked, True, None)
        if _width(console, with_extras) <= width:
            tables[-1] = with_extras
        else:
            tables.append(build_table(block, [], stacked, True, None))
    n = len(tables)
    for i, t in enumerate(tables):
        t.title = f"{block.title} ({i + 1}/{n})" if n > 1 else block.title
    return tables


def notes(board: pd.DataFrame, shown: list[Block]) -> str:
    sort = board.attrs.get("sort")
    parts = ["± = half-width of the 95% CI (several seeds: t-interval across seeds)"]
    if sort:
        parts.append(f"{BEST} = best of its bit-width by {sort}; {SAME} = not significantly "
                     f"different from it (paired metrics: paired test over samples)")
    scales = sorted({e for b in shown for m, e in b.exponents.items() if e and m in b.metrics})
    for e in scales:
        parts.append(f"{exponent_label(e)} under a name: values in units of 1e{e}")
    if any("seconds" in b.extras for b in shown):
        parts.append("time = wall-clock seconds of the whole cell")
    return "; ".join(parts)


def print_leaderboard(board: pd.DataFrame, console: Console, title: str = "ptqbench leaderboard",
                      metrics: Optional[list[str]] = None) -> None:
    shown = blocks(board, metrics, title)
    for block in shown:
        for table in layout(block, console):
            console.print(table)
            console.print()
    console.print(notes(board, shown), style="dim")
