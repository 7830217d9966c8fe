"""``ptqbench status RESULTS``: the state of every cell of an output folder.

States come from what the folder holds, so they are right whichever executor (or how many)
wrote it: ``done`` / ``failed`` from the records; ``running`` while a worker holds the cell's
lock (see :mod:`ptqbench.locks`) or SLURM says its job runs; ``pending`` while SLURM holds its
job in the queue; ``missing`` for a cell of the suite (``--suite``) or of a submission that has
no record and nothing queued or running. SLURM states come from ``sacct`` (or ``squeue``) for
the job ids the slurm executor wrote under ``slurm/submissions/``.
"""
from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import click

from .errors import PtqbenchError
from .store import Store

STATES = ("done", "failed", "running", "pending", "missing")
SLURM_PENDING = {"PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING",
                 "SUSPENDED"}
SLURM_RUNNING = {"RUNNING", "COMPLETING", "STAGE_OUT", "SIGNALING"}


@dataclass
class CellStatus:
    key: str
    title: str
    state: str  # one of STATES
    detail: str = ""
    job: Optional[str] = None


def submitted_tasks(output: Path) -> dict[str, dict]:
    """Cell key -> the latest array task that runs it (``job_id``, ``cluster``, ``submitted``)."""
    folder = Path(output) / "slurm" / "submissions"
    subs = []
    for path in folder.glob("*.json") if folder.is_dir() else []:
        try:
            subs.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    latest: dict[str, dict] = {}
    for sub in sorted(subs, key=lambda s: s.get("submitted_unix", 0)):
        for task in sub.get("tasks", []):
            for kind, key, *_ in task.get("tasks", []):
                if kind in ("cell", "finish"):
                    latest[key] = {"job_id": task["job_id"], "cluster": sub.get("cluster"),
                                   "submitted": sub.get("submitted_unix", 0)}
    return latest


def slurm_states(job_ids: list[str]) -> dict[str, str]:
    """SLURM's state of each job id (``123`` or array task ``123_4``); empty without SLURM."""
    if not job_ids:
        return {}
    ids = ",".join(sorted(set(job_ids)))
    if shutil.which("sacct"):
        cmd = ["sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j", ids]
    elif shutil.which("squeue"):
        cmd = ["squeue", "-h", "-o", "%i|%T", "-j", ids]
    else:
        return {}
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    states = {}
    for line in out.splitlines():
        job, _, state = line.strip().partition("|")
        if job and state:
            states[job] = state.split()[0]  # "CANCELLED by 123" -> CANCELLED
    return states


def cell_statuses(output: Path, suite_cells: Optional[list] = None) -> list[CellStatus]:
    store = Store(output)
    titles = {c.key: c.title() for c in suite_cells or []}
    records = {}
    for path in sorted((store.root / "records").glob("*.json")):
        rec = store.read_record(path.stem)
        if rec is not None:
            records[path.stem] = (rec, path.stat().st_mtime)
            titles.setdefault(path.stem, _title(rec))
    tasks = submitted_tasks(output)
    for key in tasks:
        titles.setdefault(key, key)
    queued = [t["job_id"] for k, t in tasks.items() if t["cluster"] == "slurm"
              and (k not in records or records[k][1] < t["submitted"])]
    slurm = slurm_states(queued)
    out = []
    for key in (list(titles) if suite_cells is None else [c.key for c in suite_cells]):
        rec, mtime = records.get(key, (None, 0.0))
        task = tasks.get(key)
        job = task["job_id"] if task else None
        status = CellStatus(key, titles[key], "missing", "no record", job)
        if store.is_locked(f"cell-{key}"):
            status.state, status.detail = "running", "a worker holds the cell's lock"
        elif job in slurm and mtime < task["submitted"] and (
                slurm[job] in SLURM_PENDING or slurm[job] in SLURM_RUNNING):
            status.state = "pending" if slurm[job] in SLURM_PENDING else "running"
            status.detail = f"SLURM: {slurm[job]}"
        elif rec is not None:
            status.state = "done" if rec.get("status") == "ok" else "failed"
            if status.state == "failed":
                err = rec.get("error") or {}
                msg = str(err.get("message", "")).strip().splitlines()
                status.detail = f"{err.get('type', 'error')}: {msg[0] if msg else ''}"
            else:
                status.detail = rec.get("finished", "")
        elif job in slurm:
            status.detail = f"no record; SLURM: {slurm[job]}"
        elif task is not None:
            status.detail = f"no record; submitted as {job} ({task['cluster']})"
        out.append(status)
    return out


def _title(rec: dict) -> str:
    c = rec.get("cell") or {}
    return " | ".join(str(c.get(k, "?")) for k in ("model", "sampler", "bits", "method")) + \
        f" | seed {c.get('seed', '?')}"


@click.command()
@click.argument("results", type=click.Path(file_okay=False, path_type=Path))
@click.option("--suite", type=click.Path(dir_okay=False, path_type=Path),
              help="Also list the cells of this suite that have not run (state missing).")
@click.option("--plain", is_flag=True, help="Tab-separated lines (state, key, cell, job, detail).")
def status(results, suite, plain):
    """State of every cell in RESULTS (an output folder): done, failed (with the reason),
    running, pending (SLURM) or missing."""
    if not results.is_dir():
        raise click.ClickException(f"{results}: no such results folder")
    cells = None
    if suite is not None:
        from .pipeline.runner import prepare

        try:
            cells = prepare(suite)[2]
        except PtqbenchError as exc:
            raise click.ClickException(str(exc)) from None
    rows = cell_statuses(results, cells)
    if plain:
        for r in rows:
            click.echo("\t".join((r.state, r.key, r.title, r.job or "", r.detail)))
        return
    from rich.console import Console
    from rich.table import Table

    colours = {"done": "green", "failed": "red", "running": "cyan", "pending": "yellow",
               "missing": "magenta"}
    table = Table(title=f"ptqbench status: {results}")
    for col in ("state", "cell", "key", "job", "detail"):
        table.add_column(col)
    for r in rows:
        table.add_row(f"[{colours[r.state]}]{r.state}[/]", r.title, r.key, r.job or "", r.detail)
    console = Console(width=max(Console().width, 140))
    console.print(table)
    counts = {s: sum(r.state == s for r in rows) for s in STATES}
    console.print(", ".join(f"{n} {s}" for s, n in counts.items() if n) or "no cells")
