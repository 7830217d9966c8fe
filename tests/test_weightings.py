"""Static weightings: uniform (free, exact) and eda-density (TDAC score of the sample's step)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ptqbench.errors import PtqbenchError
from ptqbench.interfaces import CalibSet, RunContext
from ptqbench.registry import default_registry

from ptqbench_plugins.weightings.eda_density import EdaDensity
from ptqbench_plugins.weightings.uniform import Uniform


def loop_loss(per_sample: torch.Tensor, w):
    """The reconstruction loop's contract: weights(idx) multiply per-sample losses, then mean."""
    return per_sample.mean() if w is None else (per_sample * w).mean()


def calib_with_scores(steps, scores=None):
    steps = torch.as_tensor(steps)
    n = len(steps)
    meta = {} if scores is None else {"step_scores": torch.as_tensor(scores, dtype=torch.float32)}
    return CalibSet(torch.zeros(n, 1, 2, 2), steps * 10, steps, None, meta)


CTX = RunContext(device=torch.device("cpu"), seed=0, work_dir=Path("."), cache_dir=Path("."))


def test_uniform_reproduces_the_unweighted_loss_exactly():
    u = Uniform()
    u.prepare(calib_with_scores([0, 1, 2]), None, CTX)
    g = torch.Generator().manual_seed(0)
    per_sample = torch.rand(17, generator=g) * 1e3
    idx = torch.randperm(17, generator=g)
    w = u.weights(idx)
    assert w is None
    assert loop_loss(per_sample, w).item() == per_sample.mean().item()  # bit-exact
    assert u.state() == {"kind": "uniform"}


def test_eda_density_weights_follow_step_scores_with_mean_one():
    steps = [0, 0, 1, 2, 2, 2]
    scores = [0.5, 1.0, 2.0]
    e = EdaDensity()
    e.prepare(calib_with_scores(steps, scores), None, CTX)
    w = e.weights(torch.arange(6))
    raw = torch.tensor([0.5, 0.5, 1.0, 2.0, 2.0, 2.0])
    torch.testing.assert_close(w, raw / raw.mean())
    assert abs(w.mean().item() - 1.0) < 1e-6
    assert torch.equal(e.weights(torch.tensor([3, 0])), w[[3, 0]])


def test_eda_density_equal_scores_is_the_plain_mean():
    e = EdaDensity()
    e.prepare(calib_with_scores([0, 1, 1, 2], [0.7, 0.7, 0.7]), None, CTX)
    per_sample = torch.rand(4)
    w = e.weights(torch.arange(4))
    assert torch.equal(w, torch.ones(4))
    assert loop_loss(per_sample, w).item() == per_sample.mean().item()
    e.prepare(calib_with_scores([0, 1], [0.0, 0.0]), None, CTX)  # all-zero scores -> uniform
    assert torch.equal(e.weights(torch.arange(2)), torch.ones(2))


def test_eda_density_needs_scores():
    with pytest.raises(PtqbenchError, match="step_scores"):
        EdaDensity().prepare(calib_with_scores([0, 1]), None, CTX)


def test_weightings_are_registered():
    names = default_registry(include_external=False).names("weightings")
    assert {"uniform", "eda-density", "gradient-aligned"} <= set(names)
