"""Running a suite: expand, skip finished cells, run the rest through the executor."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..registry import Registry, default_registry
from ..store import Store
from ..suite.expand import Cell, expand
from ..suite.loader import LoadedSuite, check_plugins, load_suite
from .cell import CellRunner


@dataclass
class RunSummary:
    cells: list[Cell]
    skipped: list[Cell] = field(default_factory=list)
    ok: list[Cell] = field(default_factory=list)
    failed: list[Cell] = field(default_factory=list)
    output: Optional[Path] = None


def prepare(suite_path=None, registry: Optional[Registry] = None
            ) -> tuple[LoadedSuite, Registry, list[Cell]]:
    """Load and check a suite; every user error surfaces here, before any work starts."""
    loaded = load_suite(suite_path)
    if registry is None:
        registry = default_registry()
    for f in loaded.plugin_files:
        registry.load_file(f)
    check_plugins(loaded, registry)
    return loaded, registry, expand(loaded)


def run_suite(suite_path=None, output: Optional[str | Path] = None,
              registry: Optional[Registry] = None, reporter=None, rerun_failed: bool = True,
              device: Optional[str] = None) -> RunSummary:
    loaded, registry, cells = prepare(suite_path, registry)
    out = Path(output or loaded.suite.suite.output)
    store = Store(out)
    cache = Path(loaded.suite.run.cache_dir) if loaded.suite.run.cache_dir else out / "cache"
    summary = RunSummary(cells=cells, output=out)
    todo = []
    for cell in cells:
        rec = store.read_record(cell.key)
        if rec is not None and (rec.get("status") == "ok" or not rerun_failed):
            summary.skipped.append(cell)
        else:
            todo.append(cell)
    options = dict(loaded.suite.run.executor_options)
    if device is not None:
        options["device"] = device
    executor = registry.create("executors", loaded.suite.run.executor, options)
    runner = CellRunner(loaded, registry, store, cache, reporter)

    def run_one(cell: Cell, dev) -> None:
        if reporter is not None:
            reporter.log(f"[bold]cell[/bold] {cell.title()}  ({cell.key})")
        rec = runner.run(cell, dev)
        (summary.ok if rec["status"] == "ok" else summary.failed).append(cell)
        if reporter is not None:
            if rec["status"] == "ok":
                secs = rec["costs"]["total_seconds"]
                reporter.log(f"  [green]ok[/green] in {secs:.1f} s")
            else:
                reporter.log(f"  [red]failed[/red]: {rec['error']['type']}: {rec['error']['message']}")

    executor.run_cells(todo, run_one)
    return summary
