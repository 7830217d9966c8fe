"""Cells cut into tasks, so that one cell's sampling can run on several workers at once.

Unsharded, a cell is one task (``cell``). Sharded over S workers, a quantized cell is
``prepare`` (calibrate, quantize, reconstruct; saved under work/), S ``shard`` tasks (each samples
one range of sample indices with the saved model) and ``finish`` (the cell as usual: it finds
the model and every shard, computes the metrics, writes the record). FP cells have no
``prepare``. Ranges start on multiples of the batch size, so a shard is cut into the same
batches as an unsharded run and its samples are the same bytes.

Tasks come in waves (what a wave needs was made by earlier waves): executors run a wave's tasks
in parallel — the multi-gpu executor starts a task as soon as the tasks it waits for are done,
the slurm executor submits one job array per wave.
"""
from __future__ import annotations

import os
import socket
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Optional

import torch

from ..errors import PtqbenchError
from .cell import StageTimer
from .generate import generate_range

KINDS = ("cell", "prepare", "shard", "finish")


@dataclass(frozen=True)
class Task:
    kind: str  # one of KINDS
    key: str  # the cell's key
    start: int = 0  # shard: sample indices start..stop-1
    stop: int = 0

    def waits_for(self, other: "Task") -> bool:
        """Whether this task needs ``other`` done first (only tasks of one cell wait)."""
        if other.key != self.key:
            return False
        return ((self.kind == "shard" and other.kind == "prepare")
                or (self.kind == "finish" and other.kind in ("prepare", "shard")))

    @property
    def runs_cell(self) -> bool:
        """Whether this task writes the cell's record."""
        return self.kind in ("cell", "finish")

    def label(self) -> str:
        return f"{self.kind} {self.start}-{self.stop}" if self.kind == "shard" else self.kind

    def as_list(self) -> list:
        return [self.kind, self.key, self.start, self.stop]


def parse_shards(value, executor: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PtqbenchError(f"executor {executor}: sample_shards must be a positive integer "
                            f"(the number of workers that share one cell's sampling), got {value!r}")
    return value


def shard_ranges(num_samples: int, batch_size: int, shards: int) -> list[range]:
    """``range(num_samples)`` split into at most ``shards`` contiguous ranges of whole batches,
    as even as the batches allow (fewer ranges when there are fewer batches than shards)."""
    batches = -(-num_samples // batch_size)
    shards = max(1, min(shards, batches))
    ranges, first = [], 0
    for i in range(shards):
        n = batches // shards + (1 if i < batches % shards else 0)
        stop = min(num_samples, (first + n) * batch_size)
        ranges.append(range(first * batch_size, stop))
        first += n
    return ranges


def plan(cells: list, num_samples: int, batch_size: int, shards: int = 1) -> list[list[Task]]:
    """The waves of tasks that run ``cells``. FP cells come first: every quantized cell is
    compared with their samples. Within a wave, cells that reconstruct (the longest) first."""
    cells = sorted(cells, key=_priority)
    fp = [c for c in cells if c.is_fp]
    quant = [c for c in cells if not c.is_fp]
    ranges = shard_ranges(num_samples, batch_size, shards)
    if len(ranges) == 1:
        waves = [[Task("cell", c.key) for c in fp], [Task("cell", c.key) for c in quant]]
    else:
        waves = [[Task("prepare", c.key) for c in quant]
                 + [Task("shard", c.key, r.start, r.stop) for c in fp for r in ranges],
                 [Task("shard", c.key, r.start, r.stop) for c in quant for r in ranges],
                 [Task("finish", c.key) for c in cells]]
    return [w for w in waves if w]


def _priority(cell) -> tuple:
    reconstructs = getattr(getattr(cell, "resolved", None), "reconstructor", None) not in (None, "none")
    return (not getattr(cell, "is_fp", False), not reconstructs)


def run_task(runner, cell, task: Task, device: torch.device) -> Optional[dict]:
    """Run one task of ``cell`` with ``runner`` (a CellRunner); returns the record of a task
    that runs the cell, else None."""
    if task.runs_cell:
        return runner.run(cell, device)
    try:
        _prepare_or_sample(runner, cell, task, device)
    except Exception:  # the cell's finish task redoes what is missing and records the error
        print(f"ptqbench: {task.label()} of cell {cell.key} failed; its finish task will "
              f"retry and record the error:\n{traceback.format_exc()}", file=sys.stderr)
    return None


def _prepare_or_sample(runner, cell, task: Task, device: torch.device) -> None:
    adapter = runner.adapter(cell.model)
    spec = runner.sampler_spec(cell)
    timer = StageTimer(device)
    with timer.stage("load"):
        fp_model = adapter.load(device)
    if cell.is_fp:
        model = fp_model
    else:
        # CellRunner._quantize builds and saves the model, or loads what an earlier task saved;
        # the lock keeps the shards of one cell from building it side by side.
        with timer.stage("quantize"), runner.store.lock(f"quant-{cell.quant_key}"):
            model = runner._quantize(cell, adapter, fp_model, spec, device, timer, {})
    if task.kind == "prepare":
        return
    ev = runner.loaded.suite.evaluation
    indices = range(task.start, min(task.stop, ev.num_samples))
    with timer.stage("sample"):
        generate_range(adapter, model, spec, indices, cell.seed, ev.batch_size, device,
                       runner.store, cell.gen_key)
    runner.store.write_shard_report(cell.gen_key, indices, {
        "host": socket.gethostname(), "device": str(device),
        "worker": os.environ.get("PTQBENCH_WORKER"), "seconds": timer.as_dict()["seconds"],
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")})


def run_task_in_worker(job, task: Task, device: str) -> Optional[dict]:
    """:func:`run_task` in a worker process (picklable arguments; the runner is kept)."""
    from .worker import runner_for

    runner, cell = runner_for(job, task.key, device)
    return run_task(runner, cell, task, torch.device(device))
