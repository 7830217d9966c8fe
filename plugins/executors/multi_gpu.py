"""Runs cells in parallel, one worker thread per GPU.

FP cells go first (every quantized cell is paired with their samples), then the rest. Threads
suffice: the work is GPU-bound and PyTorch releases the GIL inside kernels; the quantizers'
sampler-step state is a context variable, so workers never see each other's step.
"""
from __future__ import annotations

import queue
import threading

import torch

from ptqbench import Executor, hookimpl
from ptqbench.errors import PtqbenchError


class MultiGPUExecutor(Executor):
    name = "multi-gpu"
    description = "Run cells in parallel, one worker per GPU (option devices: 'all' or a list)"

    def __init__(self, devices="all", device: str = "auto"):
        super().__init__(devices=devices)
        if not torch.cuda.is_available():
            raise PtqbenchError("executor multi-gpu needs CUDA; use executor = \"local\" on a CPU")
        if devices == "all" or device not in ("auto", None):
            names = [device] if device not in ("auto", None) else [
                f"cuda:{i}" for i in range(torch.cuda.device_count())]
        elif isinstance(devices, list):
            names = devices
        else:
            raise PtqbenchError(f"executor multi-gpu: devices must be 'all' or a list, got {devices!r}")
        self._devices = [torch.device(n) for n in names]

    def devices(self):
        return list(self._devices)

    def run_cells(self, cells, run_one):
        fp = [c for c in cells if getattr(c, "is_fp", False)]
        rest = [c for c in cells if not getattr(c, "is_fp", False)]
        for wave in (fp, rest):
            self._run_wave(wave, run_one)

    def _run_wave(self, cells, run_one):
        todo: queue.Queue = queue.Queue()
        for c in cells:
            todo.put(c)
        errors: list[BaseException] = []

        def worker(device):
            torch.cuda.set_device(device)
            while not errors:
                try:
                    cell = todo.get_nowait()
                except queue.Empty:
                    return
                try:
                    run_one(cell, device)
                except BaseException as exc:  # run_one records cell errors itself
                    errors.append(exc)

        threads = [threading.Thread(target=worker, args=(d,), daemon=True) for d in self._devices]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]


@hookimpl
def register_executors(register):
    register(MultiGPUExecutor)
