"""Running a suite: expand, skip finished cells, run the rest through the executor."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from rich.markup import escape

from .. import numerics
from ..atomic import sweep_orphans
from ..environment import code_identity
from ..errors import PtqbenchError
from ..registry import Registry
from ..suite.expand import Cell
from .cell import CellRunner
from .setup import make_runner, prepare  # noqa: F401  (prepare: also this module's API)
from .worker import CellJob


@dataclass
class RunSummary:
    cells: list[Cell]
    skipped: list[Cell] = field(default_factory=list)
    #: finished cells kept from an earlier run whose ptqbench/plugin sources differ from these
    other_code: list[Cell] = field(default_factory=list)
    ok: list[Cell] = field(default_factory=list)
    failed: list[Cell] = field(default_factory=list)
    #: cells handed to a batch system that runs them after this command returns (slurm, wait=false)
    submitted: list[Cell] = field(default_factory=list)
    output: Optional[Path] = None


def select_cells(cells: list[Cell], models=(), bits=(), methods=(), keys=()) -> list[Cell]:
    """The cells matching every given filter (each filter: any of its values; ``keys`` are key
    prefixes as ``--dry-run`` prints them), plus the FP cells that they are paired with."""
    def check(name, wanted, have):
        unknown = sorted(set(wanted) - set(have))
        if unknown:
            raise PtqbenchError(f"--{name} {', '.join(unknown)}: not in this suite "
                                f"(it has: {', '.join(sorted(set(have)))})")

    check("model", models, [c.model for c in cells])
    check("bits", bits, [c.bits for c in cells])
    check("method", methods, [c.method for c in cells])
    for k in keys:
        hits = [c for c in cells if c.key.startswith(k)]
        if len(hits) != 1:
            raise PtqbenchError(f"--cell {k}: matches {len(hits)} cells of this suite, "
                                f"not one (see ptqbench run --dry-run)")
    chosen = [c for c in cells
              if (not models or c.model in models) and (not bits or c.bits in bits)
              and (not methods or c.method in methods)
              and (not keys or any(c.key.startswith(k) for k in keys))]
    if not chosen:
        raise PtqbenchError("no cell of this suite matches all of the given filters")
    keep = {c.key for c in chosen}
    pairs = {c.fp_gen_key for c in chosen if not c.is_fp}
    return [c for c in cells if c.key in keep or (c.is_fp and c.gen_key in pairs)]


class CellDispatch:
    """The ``run_one`` every executor receives.

    ``run_one(cell, device)`` runs a cell in this process. An executor that runs cells in other
    processes sends ``run_one.job`` there (picklable; :func:`ptqbench.pipeline.worker.run_cell`
    runs a cell of it in any process), hands each record it gets back to
    ``run_one.finished(cell, record)``, and reports a worker that died with
    ``run_one.crashed(cell, device, message)``.
    """

    def __init__(self, runner: CellRunner, job: CellJob, summary: RunSummary, reporter=None):
        self.runner, self.job, self.summary, self.reporter = runner, job, summary, reporter

    def __call__(self, cell: Cell, device) -> None:
        self.started(cell, device)
        self.finished(cell, self.runner.run(cell, device))

    def started(self, cell: Cell, device=None) -> None:
        if self.reporter is not None:
            where = f" on {device}" if device is not None else ""
            self.reporter.log(f"[bold]cell[/bold] {cell.title()}  ({cell.key}){where}")

    def finished(self, cell: Cell, record: dict) -> None:
        (self.summary.ok if record["status"] == "ok" else self.summary.failed).append(cell)
        if self.reporter is None:
            return
        if record["status"] == "ok":
            secs = record["costs"]["total_seconds"]
            self.reporter.log(f"  [green]ok[/green] {cell.title()} in {secs:.1f} s")
        else:
            err = record["error"]
            self.reporter.log(f"  [red]failed[/red] {cell.title()}: "
                              f"{escape(err['type'])}: {escape(err['message'])}")

    def submitted(self, cell: Cell, job_id: str) -> None:
        """A cell left to a batch system (it runs after this command returns)."""
        self.summary.submitted.append(cell)
        if self.reporter is not None:
            self.reporter.log(f"  [cyan]submitted[/cyan] {cell.title()} (job {job_id})")

    def crashed(self, cell: Cell, device, message: str) -> dict:
        record = self.runner.crash_record(cell, device, message)
        self.finished(cell, record)
        return record


def made_by_other_code(record: dict, code: dict) -> bool:
    """Whether a record came from other ptqbench/plugin sources than ``code`` (cell keys hash
    the suite's config, not the code or plugin defaults, so a kept result can be stale)."""
    return bool(record.get("code")) and record["code"] != code


def run_suite(suite_path=None, output: Optional[str | Path] = None,
              registry: Optional[Registry] = None, reporter=None, rerun_failed: bool = True,
              device: Optional[str] = None, select: Optional[dict] = None,
              deterministic: Optional[bool] = None) -> RunSummary:
    """Run (or resume) a suite; ``select`` = select_cells() filters (models, bits, methods,
    keys) to run only part of it; ``deterministic`` overrides the suite's ``[run]`` setting."""
    loaded, registry, cells = prepare(suite_path, registry, output=output)
    if deterministic is not None:
        loaded.suite.run.deterministic = deterministic
    if select:
        cells = select_cells(cells, **select)
    runner = make_runner(loaded, registry, output, reporter)
    summary = RunSummary(cells=cells, output=runner.store.root)
    # temporary files of writers killed mid-write (an earlier run, kill -9): never results
    sweep_orphans(runner.store.root)
    todo = []
    code = code_identity()
    for cell in cells:
        rec = runner.store.read_record(cell.key)
        if rec is not None and (rec.get("status") == "ok" or not rerun_failed):
            summary.skipped.append(cell)
            if made_by_other_code(rec, code):
                summary.other_code.append(cell)
        else:
            todo.append(cell)
    # before any CUDA library starts, here and in the worker processes that inherit it
    numerics.prepare_process(loaded.suite.run.deterministic)
    options = dict(loaded.suite.run.executor_options)
    if device is not None:
        options["device"] = device
    executor = registry.create("executors", loaded.suite.run.executor, options)
    job = CellJob(suite_file=str(Path(loaded.file).resolve()),
                  output=str(runner.store.root.resolve()), deterministic=deterministic)
    executor.run_cells(todo, CellDispatch(runner, job, summary, reporter))
    return summary
