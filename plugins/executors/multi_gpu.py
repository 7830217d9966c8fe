"""Runs cells in parallel: one worker process per device, cells handed out from one queue.

Order: FP cells first (every quantized cell is paired with their samples; a quantized cell that
gets to its metrics before they exist waits on the samples' lock), then cells that reconstruct
(the longest), then the rest, so that the devices finish at about the same time. A worker keeps
its models loaded between cells. A worker process that dies (out of memory, a segfault) fails
its cell's record; the device gets a fresh worker for the next cell.

With ``sample_shards = S`` each cell's sampling is split over S workers by sample index range
(:mod:`ptqbench.pipeline.tasks`): a worker takes the next task whose inputs exist.
"""
from __future__ import annotations

import multiprocessing
import os
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import torch

from ptqbench import Executor, hookimpl
from ptqbench.errors import PtqbenchError
from ptqbench.pipeline.tasks import parse_shards, plan, run_task_in_worker
from ptqbench.pipeline.worker import death_report, init_worker


class MultiGPUExecutor(Executor):
    name = "multi-gpu"
    description = ("Run cells in parallel, one worker process per GPU (option devices: 'all' "
                   "or a list such as [\"cuda:0\", \"cuda:2\"]; sample_shards: workers that "
                   "share one cell's sampling)")

    def __init__(self, devices="all", device: str = "auto", sample_shards: int = 1):
        super().__init__(devices=devices, sample_shards=sample_shards)
        self.sample_shards = parse_shards(sample_shards, "multi-gpu")
        if device not in ("auto", None):  # ptqbench run --device NAME: that device alone
            names = [device]
        elif devices == "all":
            if not torch.cuda.is_available():
                raise PtqbenchError('executor multi-gpu with devices = "all" needs CUDA; '
                                    'use executor = "local" on a CPU')
            names = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        elif isinstance(devices, list) and devices and all(isinstance(d, str) for d in devices):
            names = devices
        else:
            raise PtqbenchError(f"executor multi-gpu: devices must be 'all' or a non-empty list "
                                f"of device names, got {devices!r}")
        try:
            self._devices = [torch.device(n) for n in names]
        except RuntimeError as exc:
            raise PtqbenchError(f"executor multi-gpu: bad device in {names!r}: {exc}") from None
        if any(d.type == "cuda" for d in self._devices) and not torch.cuda.is_available():
            raise PtqbenchError(f"executor multi-gpu: {names!r} needs CUDA, which is not available")

    def devices(self):
        return list(self._devices)

    def run_cells(self, cells, run_one):
        if not cells:
            return
        by_key = {c.key: c for c in cells}
        ev = run_one.runner.loaded.suite.evaluation
        todo = [t for wave in plan(cells, ev.num_samples, ev.batch_size, self.sample_shards)
                for t in wave]
        unfinished = set(todo)
        changed = threading.Condition()
        threads_each = max(1, (os.cpu_count() or 1) // len(self._devices))
        errors: list[BaseException] = []

        def next_task():
            # the first task (in plan order) whose inputs are done; None when all are taken
            with changed:
                while todo and not errors:
                    for task in todo:
                        if not any(task.waits_for(o) for o in unfinished):
                            todo.remove(task)
                            return task
                    changed.wait()
                return None

        def done(task):
            with changed:
                unfinished.discard(task)
                changed.notify_all()

        def feed(index, device):
            # one thread per device feeds its worker process one task at a time
            label = f"{device}" if len(set(self._devices)) == len(self._devices) else f"worker {index}"
            fault_log = os.path.join(str(run_one.job.output), "logs", f"worker-{index}.fault")
            pool = None
            try:
                while (task := next_task()) is not None:
                    try:
                        if pool is None:
                            pool = ProcessPoolExecutor(
                                max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                                initializer=init_worker,
                                initargs=(str(device), threads_each, label, fault_log))
                        cell = by_key[task.key]
                        if task.runs_cell:
                            run_one.started(cell, label)
                        elif run_one.reporter is not None:
                            run_one.reporter.log(f"  {task.label()} of {cell.title()} on {label}")
                        try:
                            record = pool.submit(run_task_in_worker, run_one.job, task,
                                                 str(device)).result()
                        except BrokenProcessPool as exc:
                            if task.runs_cell:  # a dead shard is resampled by its finish task
                                run_one.crashed(cell, device, f"the worker process on {label} "
                                                              f"died while running this cell ({exc}"
                                                              f"; {death_report(pool, fault_log)})")
                            pool.shutdown(wait=False, cancel_futures=True)
                            pool = None
                            continue
                        if task.runs_cell:
                            run_one.finished(cell, record)
                    finally:
                        done(task)
            except BaseException as exc:
                with changed:
                    errors.append(exc)
                    changed.notify_all()
            finally:
                if pool is not None:
                    pool.shutdown(wait=True)

        threads = [threading.Thread(target=feed, args=(i, d), daemon=True)
                   for i, d in enumerate(self._devices)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]


@hookimpl
def register_executors(register):
    register(MultiGPUExecutor)
