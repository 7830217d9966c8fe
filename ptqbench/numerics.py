"""Process-wide numerics settings of a run: deterministic mode, and what the record says of them.

Deterministic mode (``[run] deterministic = true``) makes a cell's record reproducible bit for
bit on the same machine and software: every generator is seeded from the cell's seed before the
cell runs (and reconstruction draws its batches from generators seeded per unit), PyTorch runs
deterministic algorithms only (``torch.use_deterministic_algorithms``: an op without one raises
instead of silently varying), cuDNN picks its algorithms without benchmarking, and cuBLAS gets a
fixed workspace (``CUBLAS_WORKSPACE_CONFIG``, which must be set before the process's first
cuBLAS call: the run sets it before any cell starts, and worker processes inherit it). TF32 is
not switched off - it is deterministic too - but recorded, as are the other flags.
"""
from __future__ import annotations

import os
import random

import numpy as np
import torch

CUBLAS_WORKSPACE = ":4096:8"


def prepare_process(deterministic: bool) -> None:
    """Environment that must exist before CUDA libraries start (call before any cell runs)."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)


def configure(deterministic: bool, seed: int) -> dict:
    """Seed every generator and set the deterministic flags for one cell; returns
    :func:`state` (what the record keeps)."""
    prepare_process(deterministic)
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.deterministic = deterministic
    if deterministic:
        torch.backends.cudnn.benchmark = False
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)  # also every CUDA device's default generator
    return state()


def state() -> dict:
    """The numerics flags in force (record field ``numerics``)."""
    return {
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
        "tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32),
        "tf32_cudnn": bool(torch.backends.cudnn.allow_tf32),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "torch_threads": torch.get_num_threads(),
    }
