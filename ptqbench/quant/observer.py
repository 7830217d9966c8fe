"""Activation statistics for range initialisation: exact extrema + a uniform value sample.

The sample is a bottom-k sample (every value gets a random key, the k smallest keys are kept), so
it is uniform over the whole calibration set whatever the batch order, with bounded memory.
One group per sampler step for per-step quantizers, plus the pooled group that steps without
calibration data fall back to.
"""
from __future__ import annotations

from typing import Optional

import torch


class _Group:
    __slots__ = ("min", "max", "keys", "values", "count")

    def __init__(self):
        self.min = self.max = None
        self.keys = self.values = None
        self.count = 0

    def update(self, x: torch.Tensor, keep: int, sample: bool, gen: torch.Generator) -> None:
        x = x.detach().reshape(-1).float()
        if x.numel() == 0:
            return
        lo, hi = x.min(), x.max()
        self.min = lo if self.min is None else torch.minimum(self.min, lo)
        self.max = hi if self.max is None else torch.maximum(self.max, hi)
        self.count += x.numel()
        if not sample:
            return
        keys = torch.rand(x.numel(), generator=gen, device=x.device)
        if self.values is not None:
            keys = torch.cat([self.keys, keys])
            x = torch.cat([self.values, x])
        if x.numel() > keep:
            keys, idx = torch.topk(keys, keep, largest=False, sorted=False)
            x = x[idx]
        self.keys, self.values = keys, x


class RangeObserver:
    def __init__(self, num_steps: int, keep: int, sample: bool, seed: int = 0):
        self.num_steps, self.keep, self.sample = num_steps, keep, sample
        self.pooled = _Group()
        self.steps = [_Group() for _ in range(num_steps)] if num_steps > 1 else []
        self.seed = seed
        self._gens: dict = {}

    def _gen(self, device) -> torch.Generator:
        key = str(device)
        if key not in self._gens:
            self._gens[key] = torch.Generator(device=device).manual_seed(self.seed)
        return self._gens[key]

    def update(self, x: torch.Tensor, step: Optional[object]) -> None:
        gen = self._gen(x.device)
        self.pooled.update(x, self.keep, self.sample, gen)
        if not self.steps:
            return
        if step is None:
            step = 0
        if isinstance(step, int):
            self.steps[step].update(x, self.keep, self.sample, gen)
            return
        step = step.to(x.device)
        for k in torch.unique(step).tolist():  # host sync: fine during calibration
            self.steps[k].update(x[step == k], self.keep, self.sample, gen)
