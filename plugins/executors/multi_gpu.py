"""Runs cells in parallel: one worker process per device, cells handed out from one queue.

Order: FP cells first (every quantized cell is paired with their samples; a quantized cell that
gets to its metrics before they exist waits on the samples' lock), then cells that reconstruct
(the longest), then the rest, so that the devices finish at about the same time. A worker keeps
its models loaded between cells. A worker process that dies (out of memory, a segfault) fails
its cell's record; the device gets a fresh worker for the next cell.
"""
from __future__ import annotations

import multiprocessing
import os
import queue
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import torch

from ptqbench import Executor, hookimpl
from ptqbench.errors import PtqbenchError
from ptqbench.pipeline.worker import init_worker, run_cell


class MultiGPUExecutor(Executor):
    name = "multi-gpu"
    description = ("Run cells in parallel, one worker process per GPU (option devices: 'all' "
                   "or a list such as [\"cuda:0\", \"cuda:2\"])")

    def __init__(self, devices="all", device: str = "auto"):
        super().__init__(devices=devices)
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
        todo: queue.Queue = queue.Queue()
        for cell in sorted(cells, key=_priority):
            todo.put(cell)
        threads_each = max(1, (os.cpu_count() or 1) // len(self._devices))
        errors: list[BaseException] = []

        def feed(index, device):
            # one thread per device feeds its worker process one cell at a time
            label = f"{device}" if len(set(self._devices)) == len(self._devices) else f"worker {index}"
            pool = None
            try:
                while not errors:
                    try:
                        cell = todo.get_nowait()
                    except queue.Empty:
                        return
                    if pool is None:
                        pool = ProcessPoolExecutor(
                            max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                            initializer=init_worker, initargs=(str(device), threads_each, label))
                    run_one.started(cell, label)
                    try:
                        record = pool.submit(run_cell, run_one.job, cell.key, str(device)).result()
                    except BrokenProcessPool as exc:
                        run_one.crashed(cell, device, f"the worker process on {label} died while "
                                                      f"running this cell ({exc})")
                        pool.shutdown(wait=False, cancel_futures=True)
                        pool = None
                        continue
                    run_one.finished(cell, record)
            except BaseException as exc:
                errors.append(exc)
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


def _priority(cell) -> tuple:
    reconstructs = getattr(getattr(cell, "resolved", None), "reconstructor", None) not in (None, "none")
    return (not getattr(cell, "is_fp", False), not reconstructs)


@hookimpl
def register_executors(register):
    register(MultiGPUExecutor)
