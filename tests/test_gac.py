"""GAC: the meta-gradient against finite differences, the weights as a distribution, the
schedule of meta steps, and the absence of host synchronisation in the hot path."""
from __future__ import annotations

from pathlib import Path

import dataclasses

import pytest
import torch

from ptqbench.calib import gac
from ptqbench.calib.gac import (meta_gradient, softmax_backward, surrogate_value,
                                timestep_groups)
from ptqbench.calib.testing import FakeQuantConv, block_context
from ptqbench.errors import PtqbenchError
from ptqbench.interfaces import Block, CalibSet, RunContext

from ptqbench_plugins.weightings.gradient_aligned import GradientAligned

D = torch.float64
CTX = RunContext(device=torch.device("cpu"), seed=0, work_dir=Path("."), cache_dir=Path("."))


def problem(n=12, v=10, eta=0.5, dtype=D, iterations=20, batch_size=4):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, 5, 5, generator=g, dtype=dtype)
    t = torch.randint(0, 1000, (n,), generator=g)
    step = 9 - t // 100
    vx = torch.randn(v, 3, 5, 5, generator=g, dtype=dtype)
    vstep = torch.arange(v) % 10
    vt = (9 - vstep) * 100 + 5
    block = FakeQuantConv(bits=3).to(dtype)
    ctx = block_context(block, x, t, step, vx, vt, vstep, inner_lr=eta, iterations=iterations,
                        batch_size=batch_size, target_noise=0.3)
    calib = CalibSet(x, t, step)
    val = CalibSet(vx, vt, vstep)
    return ctx, calib, val


@pytest.mark.parametrize("objective", ["cosine", "dot"])
@pytest.mark.parametrize("jacobian", ["linearise", "materialise"])
@pytest.mark.parametrize("mode,vectorize", [("forward", True), ("forward", False),
                                            ("reverse", True), ("reverse", False)])
def test_meta_gradient_matches_finite_differences(mode, vectorize, jacobian, objective):
    ctx, _, _ = problem()
    groups = timestep_groups(ctx.val_step, 3)
    idx = torch.tensor([0, 3, 5, 7, 11])
    w = torch.softmax(torch.randn(12, generator=torch.Generator().manual_seed(1), dtype=D), 0)
    eta = 0.5 if objective == "dot" else 1e-3
    res = meta_gradient(ctx, ctx.params, w, idx, groups, eta=eta, mode=mode,
                        vectorize=vectorize, jacobian=jacobian, objective=objective)
    eps = 1e-6
    fd = torch.zeros(len(idx), dtype=D)
    for j, i in enumerate(idx):
        wp, wm = w.clone(), w.clone()
        wp[i] += eps
        wm[i] -= eps
        fd[j] = (surrogate_value(ctx, ctx.params, wp, idx, groups, eta, objective=objective)
                 - surrogate_value(ctx, ctx.params, wm, idx, groups, eta, objective=objective)
                 ) / (2 * eps)
    torch.testing.assert_close(res.grad_w, fd, rtol=1e-5, atol=1e-7)
    # the reported losses are the objective's two terms
    mse_term = res.l_mse if objective == "dot" else torch.log(res.l_mse)
    torch.testing.assert_close(res.l_gm + mse_term, surrogate_value(
        ctx, ctx.params, w, idx, groups, eta, objective=objective))
    # and the gradient-matching term is not negligible in this problem
    no_gm = meta_gradient(ctx, ctx.params, w, idx, groups, eta=eta, gm_weight=0.0, mode=mode,
                          vectorize=vectorize, jacobian=jacobian, objective=objective)
    share = 0.1 if objective == "dot" else 0.01  # this toy's groups nearly agree
    assert (no_gm.grad_w - res.grad_w).abs().max() > share * res.grad_w.abs().max()
    torch.testing.assert_close(no_gm.grad_w, res.grad_mse)


def test_logit_gradient_through_softmax_matches_finite_differences():
    ctx, _, _ = problem()
    groups = timestep_groups(ctx.val_step, 2)
    idx = torch.tensor([1, 2, 6, 8])
    tau = 0.7
    s = torch.randn(12, generator=torch.Generator().manual_seed(2), dtype=D)
    w = torch.softmax(s / tau, 0)
    res = meta_gradient(ctx, ctx.params, w, idx, groups, eta=1e-3)
    full = torch.zeros(12, dtype=D).index_put_((idx,), res.grad_w)
    grad_s = softmax_backward(w, full, tau)
    eps = 1e-6
    for k in (1, 4, 8):  # in the batch, outside it (softmax couples them), in it
        sp, sm = s.clone(), s.clone()
        sp[k] += eps
        sm[k] -= eps
        fd = (surrogate_value(ctx, ctx.params, torch.softmax(sp / tau, 0), idx, groups, 1e-3,
                              objective="cosine")
              - surrogate_value(ctx, ctx.params, torch.softmax(sm / tau, 0), idx, groups, 1e-3,
                                objective="cosine")) / (2 * eps)
        torch.testing.assert_close(grad_s[k], fd, rtol=1e-5, atol=1e-8)


def run_block(weighting, ctx, calib, val, iterations=None):
    weighting.prepare(calib, val, CTX)
    weighting.begin_block(ctx)
    g = torch.Generator().manual_seed(5)
    for it in range(iterations if iterations is not None else ctx.iterations):
        idx = torch.randperm(len(calib), generator=g)[:ctx.batch_size]
        w = weighting.weights(idx)
        weighting.observe(it, idx, torch.rand(len(idx)), ctx)
        assert w is not None and w.shape == idx.shape
    weighting.end_block(ctx)


def test_learned_weights_remain_a_distribution():
    ctx, calib, val = problem()
    gw = GradientAligned(meta_lr=0.2, meta_steps=15, groups=3)
    run_block(gw, ctx, calib, val)
    p = gw.distribution()
    assert torch.isfinite(p).all() and (p > 0).all()
    torch.testing.assert_close(p.sum(), torch.tensor(1.0, dtype=p.dtype))
    w = gw.weights(torch.arange(12))
    torch.testing.assert_close(w.mean(), torch.tensor(1.0, dtype=w.dtype))
    assert w.std() > 0.05  # they did move away from uniform
    st = gw.state()["blocks"]["fake"]
    assert st["meta_steps"] == 15 and st["groups"] == 3
    assert set(st["weight_by_step"]) == set(calib.step.tolist())
    assert torch.equal(gw.block_weights["fake"], w.cpu())


@pytest.mark.parametrize("objective,eta", [("cosine", 1e-3), ("dot", 0.5)])
def test_meta_steps_decrease_the_objective(objective, eta):
    ctx, calib, val = problem()
    # the full batch every meta step: plain gradient descent on L_VAL (SGD, exact gradient)
    gw = GradientAligned(meta_lr=0.02, meta_steps=40, meta_batch_size=12, groups=3,
                         objective=objective, inner_lr=eta, inner_step="sgd")
    gw.prepare(calib, val, CTX)
    s0 = torch.full((12,), 1 / 32, dtype=D)
    groups = timestep_groups(ctx.val_step, 3)
    full = torch.arange(12)
    before = surrogate_value(ctx, ctx.params, torch.softmax(s0, 0), full, groups, eta,
                             objective=objective)
    gw.begin_block(ctx)
    after = surrogate_value(ctx, ctx.params, gw.distribution(), full, groups, eta,
                            objective=objective)
    assert after < before - 1e-3 * abs(before)


def test_alternate_mode_spreads_meta_steps_over_reconstruction(monkeypatch):
    ctx, calib, val = problem(iterations=20)
    calls = []
    real = gac.meta_gradient

    def spy(*args, **kw):
        calls.append(1)
        return real(*args, **kw)

    monkeypatch.setattr("ptqbench_plugins.weightings.gradient_aligned.meta_gradient", spy)
    gw = GradientAligned(meta_steps=4, alternate=True)
    gw.prepare(calib, val, CTX)
    gw.begin_block(ctx)
    assert calls == []  # nothing before reconstruction starts
    for it in range(20):
        gw.observe(it, torch.arange(4), torch.rand(4), ctx)
    assert len(calls) == 4  # iterations 0, 5, 10, 15
    upfront = GradientAligned(meta_steps=None, meta_batch_size=5)
    calls.clear()
    upfront.prepare(calib, val, CTX)
    upfront.begin_block(ctx)
    assert len(calls) == 3  # default: one pass over the 12 samples in batches of 5


def test_reset_per_block_restarts_from_uniform():
    ctx, calib, val = problem()
    gw = GradientAligned(meta_lr=0.2, meta_steps=5)
    run_block(gw, ctx, calib, val, iterations=0)
    first = gw.weights(torch.arange(12)).clone()
    assert not torch.allclose(first, torch.ones(12))
    gw.meta_steps = 0  # next block: no meta step, so we see where it starts from
    gw.begin_block(other_block(ctx))
    torch.testing.assert_close(gw.weights(torch.arange(12)), torch.ones(12))
    carry = GradientAligned(meta_lr=0.2, meta_steps=5, reset_per_block=False)
    run_block(carry, ctx, calib, val, iterations=0)
    carry.meta_steps = 0
    carry.begin_block(other_block(ctx))
    torch.testing.assert_close(carry.weights(torch.arange(12)), first)


def other_block(ctx):
    return dataclasses.replace(ctx, block=Block("next", ctx.block.module, "layer"))


def test_later_phases_of_a_block_keep_its_weights(monkeypatch):
    ctx, calib, val = problem()
    gw = GradientAligned(meta_lr=0.2, meta_steps=4, alternate=True)
    run_block(gw, ctx, calib, val)  # phase 1: 4 meta steps spread over 20 iterations
    learned = gw.weights(torch.arange(12)).clone()
    record = dict(gw.state()["blocks"]["fake"])
    calls = []
    monkeypatch.setattr("ptqbench_plugins.weightings.gradient_aligned.meta_gradient",
                        lambda *a, **k: calls.append(1))
    run_block(gw, ctx, calib, val)  # phase 2 of the same block (e.g. activation step sizes)
    assert calls == []
    torch.testing.assert_close(gw.weights(torch.arange(12)), learned)
    assert gw.state()["blocks"]["fake"] == record and record["meta_steps"] == 4


class _NoSync:
    """Make every host-synchronising tensor call raise."""
    NAMES = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__")

    def __init__(self, monkeypatch):
        self.mp = monkeypatch

    def __enter__(self):
        def boom(*a, **k):
            raise AssertionError("host synchronisation in the hot path")
        for name in self.NAMES:
            self.mp.setattr(torch.Tensor, name, boom)
        return self

    def __exit__(self, *exc):
        self.mp.undo()


def test_meta_step_and_weights_do_not_synchronise(monkeypatch):
    ctx, calib, val = problem()
    gw = GradientAligned(meta_steps=2, alternate=True)
    gw.prepare(calib, val, CTX)
    gw.begin_block(ctx)
    groups = timestep_groups(ctx.val_step, 5)
    w = torch.softmax(torch.zeros(12, dtype=D), 0)
    idx = torch.tensor([0, 1, 2, 3])
    with _NoSync(monkeypatch):
        for mode in ("forward", "reverse"):
            for vectorize in (True, False):
                for jacobian in ("linearise", "materialise"):
                    meta_gradient(ctx, ctx.params, w, idx, groups, 0.5, mode=mode,
                                  vectorize=vectorize, jacobian=jacobian,
                                  inner_step="normalized")
        gw.weights(idx)
        gw.observe(1, idx, torch.rand(4), ctx)  # not a meta iteration
        gw.observe(10, idx, torch.rand(4), ctx)  # a meta iteration: step, balance, SGD update
        assert gw._done == 1


def test_timestep_groups_are_adjacent_and_balanced():
    steps = torch.tensor([9, 0, 3, 3, 5, 1, 7, 2, 8, 4, 6, 0])
    groups = timestep_groups(steps, 5)
    assert len(groups) == 5
    got = [sorted(set(steps[g].tolist())) for g in groups]
    assert got == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    assert sorted(torch.cat(groups).tolist()) == list(range(12))
    assert len(timestep_groups(torch.tensor([4, 4, 2]), 5)) == 2  # fewer distinct steps


def test_needs_validation_and_checks_options():
    ctx, calib, val = problem()
    with pytest.raises(PtqbenchError, match="validation set"):
        GradientAligned().prepare(calib, None, CTX)
    for opts, bad in (({"tau": 0}, "tau"), ({"groups": 0}, "groups"),
                      ({"meta_lr": -1}, "meta_lr"), ({"alternate": "yes"}, "alternate"),
                      ({"autodiff": "fwd"}, "autodiff"), ({"jacobian": "full"}, "jacobian"),
                      ({"inner_lr": 0}, "inner_lr"),
                      ({"validation_fraction": 0}, "validation_fraction"),
                      ({"meta_batch_size": 0}, "meta_batch_size"),
                      ({"val_batch_size": 0}, "val_batch_size"),
                      ({"val_batch_size": "full"}, "val_batch_size.*'all'"),
                      ({"cuda_graph": "yes"}, "cuda_graph")):
        with pytest.raises(PtqbenchError, match=bad):
            GradientAligned(**opts)
    # TOML has no null: words spell "the whole validation set" / "the reconstruction batch"
    gw = GradientAligned(val_batch_size="all", meta_batch_size="reconstruction", meta_steps=1)
    assert gw.val_batch_size is None and gw.meta_batch_size is None
    run_block(gw, ctx, calib, val, iterations=0)
    assert gw.state()["blocks"]["fake"]["meta_batch_size"] == ctx.batch_size


def test_validation_fraction_subsamples_equally_per_step():
    ctx, calib, _ = problem()
    vstep = torch.arange(4).repeat_interleave(5)  # 4 steps x 5 samples
    val = CalibSet(torch.zeros(20, 3, 5, 5), (9 - vstep) * 100, vstep)
    gw = GradientAligned(validation_fraction=0.5)  # 6 samples over 4 steps -> 2 per step
    gw.prepare(calib, val, CTX)
    assert torch.bincount(vstep[gw._val_idx]).tolist() == [2, 2, 2, 2]
    with pytest.raises(PtqbenchError, match="per step"):
        GradientAligned(validation_fraction=0.99).prepare(
            CalibSet(torch.zeros(100, 1), torch.zeros(100), torch.zeros(100)), val, CTX)


def test_falls_back_when_a_transform_fails(monkeypatch):
    ctx, calib, val = problem()
    real = gac.meta_gradient
    seen = []

    def picky(*args, **kw):
        seen.append((kw["jacobian"], kw["mode"], kw["vectorize"]))
        if kw["vectorize"]:
            raise RuntimeError("no batching rule for some op")
        return real(*args, **kw)

    monkeypatch.setattr("ptqbench_plugins.weightings.gradient_aligned.meta_gradient", picky)
    gw = GradientAligned(meta_steps=2)
    run_block(gw, ctx, calib, val, iterations=0)
    # per-sample vmapping first (small block), then products by autodiff, then no vmap at all
    assert seen == [("materialise", "reverse", True), ("linearise", "reverse", True),
                    ("linearise", "reverse", False), ("linearise", "reverse", False)]
    assert gw.state()["blocks"]["fake"]["autodiff"] == "reverse"
    assert gw.state()["blocks"]["fake"]["jacobian"] == "linearise"
    strict = GradientAligned(meta_steps=1, autodiff="reverse")
    monkeypatch.setattr("ptqbench_plugins.weightings.gradient_aligned.meta_gradient",
                        lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        run_block(strict, ctx, calib, val, iterations=0)


def test_meta_updates_do_not_depend_on_the_loss_scale(monkeypatch):
    # A real model's block has meta gradients ~1e-12, far below Adam's eps; on cifar10-ddpm-s
    # the weights stayed uniform until the meta gradients were normalised per block.
    from ptqbench_plugins.weightings import gradient_aligned as plugin

    def learned(scale, normalize):
        real = gac.meta_gradient

        def scaled(*args, **kwargs):
            res = real(*args, **kwargs)
            return dataclasses.replace(res, grad_w=res.grad_w * scale,
                                       grad_mse=res.grad_mse * scale,
                                       grad_gm=res.grad_gm * scale)

        monkeypatch.setattr(plugin, "meta_gradient", scaled)
        ctx, calib, val = problem()
        gw = GradientAligned(meta_lr=0.2, meta_steps=15, groups=3,
                             normalize_meta_grad=normalize)
        run_block(gw, ctx, calib, val)
        return gw.weights(torch.arange(12))

    reference = learned(1.0, True)
    assert reference.std() > 0.05
    # float32 logits: centring the meta-gradient loses a few digits to cancellation
    torch.testing.assert_close(learned(1e-12, True), reference, rtol=2e-3, atol=2e-3)
    assert learned(1e-12, False).std() < 1e-3  # the failure mode it prevents
    st_scale = GradientAligned(normalize_meta_grad=True)
    with pytest.raises(PtqbenchError):
        GradientAligned(normalize_meta_grad="yes")
    assert st_scale.options["normalize_meta_grad"] is True
