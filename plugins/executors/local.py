"""Runs cells one after another on one device (the first GPU if there is one, else the CPU)."""
from __future__ import annotations

import torch

from ptqbench import Executor, hookimpl
from ptqbench.errors import PtqbenchError


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise PtqbenchError(f"bad device {name!r}: {exc}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PtqbenchError(f"device {name!r} requested but CUDA is not available")
    return dev


class LocalExecutor(Executor):
    name = "local"
    description = "Run cells sequentially on one device (option device: auto, cpu, cuda, cuda:N)"

    def __init__(self, device: str = "auto", threads: int = 0):
        super().__init__(device=device, threads=threads)
        self.device = pick_device(device)
        if threads:
            torch.set_num_threads(threads)

    def devices(self):
        return [self.device]

    def run_cells(self, cells, run_one):
        for cell in cells:
            run_one(cell, self.device)


@hookimpl
def register_executors(register):
    register(LocalExecutor)
