"""How a regression check reads: a rich table for the terminal, a markdown summary for CI logs."""
from __future__ import annotations

from typing import Optional

from .check import CheckResult, MetricCheck

HEADER = ["cell", "metric", "baseline", "run", "worse by", "tolerance", "test", "verdict"]
_STYLE = {"regressed": "bold red", "missing": "bold red", "improved": "green", "ok": ""}


def verdict_line(result: CheckResult) -> str:
    counts = [f"{result.compared_cells} cells compared",
              f"{len(result.identical)} identical to the baseline",
              f"{len(result.regressions)} regressed metric(s)"]
    for what in ("failed", "missing", "new", "not reproduced"):
        n = sum(1 for x in result.notes if x.what == what)
        if n:
            counts.append(f"{n} {what}")
    return ("PASSED" if result.passed else "FAILED") + ": " + ", ".join(counts)


def context_lines(result: CheckResult) -> list[str]:
    """Why results may legitimately differ from the baseline's bits."""
    out = []
    if result.code_changed:
        out.append("the ptqbench/plugin sources differ from the baseline's (records' 'code')")
    if result.numerics_changed:
        out.append("numerics differ from the baseline's (" + "; ".join(result.numerics_changed)
                   + "): bit-identical results are not expected")
    return out


def rows(result: CheckResult, only_failing: bool = False, short: bool = False
         ) -> list[list[str]]:
    """Formatted rows; ``short`` leaves out the model and sampler when every row has the same."""
    out = []
    short = short and len({m.ident[:2] for m in result.metrics}) == 1
    for m in result.metrics:
        if only_failing and m.verdict not in ("regressed", "missing"):
            continue
        out.append([_cell(m.ident, short), m.metric, _num(m.baseline), _num(m.current), _worse(m),
                    _num(m.tolerance), m.test, m.verdict + (f" ({m.note})" if m.note else "")])
    return out


def print_rich(result: CheckResult, console=None, title: Optional[str] = None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    idents = {m.ident[:2] for m in result.metrics}
    title = title or "ptqbench check"
    if len(idents) == 1:
        title += " ({} / {})".format(*next(iter(idents)))
    table = Table(title=title)
    for h in HEADER:
        table.add_column(h, justify="left" if h in ("cell", "metric", "test", "verdict")
                         else "right", no_wrap=h != "verdict")
    for m, r in zip(result.metrics, rows(result, short=True)):
        table.add_row(*r, style=_STYLE.get(m.verdict) or None)
    if result.metrics:
        # CI logs are not terminals (80 columns): a table that wide would be cut
        Console(width=max(console.width, 150), file=console.file).print(table)
    for note in result.notes:
        style = "bold red" if note.failure else "yellow"
        console.print(f"{note.what}: {_cell(note.ident)}: {note.detail}", style=style,
                      highlight=False)
    for line in context_lines(result):
        console.print(line, style="dim", highlight=False)
    console.print(verdict_line(result), style="bold green" if result.passed else "bold red",
                  highlight=False)


def to_markdown(result: CheckResult, title: str = "ptqbench check", baseline: str = "") -> str:
    mark = "passed" if result.passed else "**FAILED**"
    lines = [f"## {title}: {mark}", "", verdict_line(result) + (f" (baseline `{baseline}`)"
                                                               if baseline else ""), ""]
    failing = rows(result, only_failing=True)
    if failing:
        lines += ["### Regressions", ""] + _table(failing) + [""]
    if result.notes:
        lines += ["### Cells", ""]
        lines += [f"- {'**' + n.what + '**' if n.failure else n.what}: {_cell(n.ident)}: "
                  f"{n.detail}" for n in result.notes] + [""]
    if context_lines(result):
        lines += [line + "  " for line in context_lines(result)] + [""]
    if result.metrics:
        lines += ["<details><summary>every compared metric</summary>", ""]
        lines += _table(rows(result)) + ["", "</details>", ""]
    lines += ["worse by: how much worse the run is in the metric's direction (negative: better); "
              "a metric regresses when it is worse by more than its tolerance (statistical: "
              "paired bootstrap over the samples for paired metrics, else both 95% intervals; "
              "plus the slack).", ""]
    return "\n".join(lines)


def _table(body: list[list[str]]) -> list[str]:
    return (["| " + " | ".join(HEADER) + " |", "|" + "|".join("---" for _ in HEADER) + "|"]
            + ["| " + " | ".join(c.replace("|", "/") for c in r) + " |" for r in body])


def _cell(ident, short: bool = False) -> str:
    model, sampler, bits, method, seed = ident
    return ("" if short else f"{model}/{sampler} ") + f"{bits} {method} seed {seed}"


def _worse(m: MetricCheck) -> str:
    if m.worse is None:
        return "n/a"
    text = f"{m.worse:+.4g}"
    if m.baseline:
        text += f" ({100 * m.worse / abs(m.baseline):+.2g}%)"
    return text


def _num(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x:.6g}"
