"""Running cells of a suite in worker processes (e.g. one per GPU).

A worker rebuilds the suite from its file (the default registry: built-ins, entry points unless
``PTQBENCH_LOAD_EXTERNAL_PLUGINS=0``, and the suite's plugin files) and keeps it, with the models
it loaded, for every later cell it runs. Processes, not threads: each worker has its own
interpreter lock, its own global numerics flags (the metrics switch TF32 off while they run) and
its own CUDA-graph captures, so parallel cells cannot disturb each other.
"""
from __future__ import annotations

import faulthandler
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch


@dataclass(frozen=True)
class CellJob:
    """What a worker process needs to run cells of one suite run (picklable)."""
    suite_file: str
    output: str
    deterministic: Optional[bool] = None  # overrides the suite's [run] deterministic


_runners: dict = {}  # per process: job -> (CellRunner, {cell key: Cell})


def init_worker(device: str, threads: Optional[int] = None, label: Optional[str] = None,
                fault_log: Optional[str] = None) -> None:
    """Process initialiser: die with the parent, pin the GPU, share the CPU cores fairly, and
    (``fault_log``) have a fatal signal (a segfault in a native kernel, an abort) write every
    thread's Python traceback there: a dead worker otherwise leaves nothing to go on."""
    _die_with_parent()
    if fault_log:
        Path(fault_log).parent.mkdir(parents=True, exist_ok=True)
        # kept open for the process's life: faulthandler writes to the descriptor at the crash
        faulthandler.enable(file=open(fault_log, "w"), all_threads=True)
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if threads:
        torch.set_num_threads(threads)
    os.environ["PTQBENCH_WORKER"] = label or device


def run_cell(job: CellJob, cell_key: str, device: str) -> dict:
    """Run the cell ``cell_key`` of ``job`` on ``device`` in this process; returns its record."""
    runner, cell = runner_for(job, cell_key, device)
    return runner.run(cell, torch.device(device))


def runner_for(job: CellJob, cell_key: str, device: str):
    """This process's runner of ``job`` (built once, kept with its loaded models) and the cell."""
    if job not in _runners:
        from ..progress import Reporter
        from .setup import make_runner, prepare

        loaded, registry, cells = prepare(job.suite_file, output=job.output)
        if job.deterministic is not None:
            loaded.suite.run.deterministic = job.deterministic
        reporter = Reporter(enabled=False, prefix=f"[{os.environ.get('PTQBENCH_WORKER', device)}] ")
        _runners[job] = (make_runner(loaded, registry, job.output, reporter),
                         {c.key: c for c in cells})
    runner, cells = _runners[job]
    if cell_key not in cells:
        raise KeyError(f"cell {cell_key} is not in {job.suite_file} as this worker reads it "
                       f"(was the suite edited while it ran?)")
    return runner, cells[cell_key]


def _die_with_parent() -> None:
    # A parent killed by a timeout or a scheduler must not leave workers writing on (Linux only).
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def death_report(pool, fault_log: Optional[str]) -> str:
    """What is known about a worker process that died: its exit code (a negative one is the
    signal that killed it: -9 is SIGKILL, often the kernel's out-of-memory killer; -11 a
    segfault) and the end of its fault log."""
    parts = []
    # the pool's processes are private, but there is no other way to reach the exit code
    for proc in list((getattr(pool, "_processes", None) or {}).values()):
        proc.join(timeout=10)  # the pool reports the death before it has reaped the process
        code = proc.exitcode
        if code is not None and code != 0:
            name = ""
            if code < 0:
                try:
                    name = f" ({signal.Signals(-code).name})"
                except ValueError:
                    pass
            parts.append(f"exit code {code}{name}")
    if fault_log and Path(fault_log).is_file():
        # the stack, not the list of loaded extension modules that follows it
        text = Path(fault_log).read_text(errors="replace").split("\nExtension modules:")[0]
        if text.strip():
            parts.append(f"fault log {fault_log}:\n{text.strip()[:2000]}")
    return "; ".join(parts) or "no exit code or fault log was left"
