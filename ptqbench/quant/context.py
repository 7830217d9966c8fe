"""Which sampler step the quantized model is being run for.

Per-timestep activation parameters (TFMQ-DM style) index their scale by the sampler step; the
model itself has no such argument, so the caller states it around the call::

    with sampler_step(k):          # int, or LongTensor (N,) with one step per sample
        eps = adapter.denoise(qmodel, x, t)

Outside any context quantizers use step 0 (shared parameters have only that one).
A context variable (not a global) keeps concurrent threads/tasks from seeing each other's step.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Union

import torch

StepLike = Union[int, torch.Tensor, None]

_STEP: contextvars.ContextVar[StepLike] = contextvars.ContextVar("ptqbench_sampler_step",
                                                                 default=None)


@contextlib.contextmanager
def sampler_step(k: StepLike):
    """Run the enclosed model calls as sampler step ``k`` (int or LongTensor of shape (N,))."""
    if isinstance(k, torch.Tensor):
        if k.dim() == 0:
            k = int(k)
        else:
            k = k.long()
    elif k is not None:
        k = int(k)
    token = _STEP.set(k)
    try:
        yield
    finally:
        _STEP.reset(token)


def current_step() -> StepLike:
    """The step set by the innermost ``sampler_step`` context, or None."""
    return _STEP.get()
