"""GAC after issue 12: known answers for the meta-gradient (an independent autograd computation,
float64), weights that do not depend on the order samples are visited in, a corrupted timestep
group down-weighted with the default options, and the L_GM share in the record."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from torch.func import functional_call

from ptqbench.calib import gac
from ptqbench.calib.gac import MetaResult, meta_gradient, softmax_backward, timestep_groups
from ptqbench.calib.testing import FakeQuantConv, block_context
from ptqbench.interfaces import CalibSet, RunContext
from ptqbench.quant.reconstruction import per_sample_loss

from ptqbench_plugins.weightings import gradient_aligned as plugin
from ptqbench_plugins.weightings.gradient_aligned import GradientAligned

D = torch.float64
CTX = RunContext(device=torch.device("cpu"), seed=0, work_dir=Path("."), cache_dir=Path("."))


def make_problem(n=24, v=20, steps=10, cout=4, seed=0):
    """A small conv block with AdaRound-like and step-size parameters, calibration and
    validation samples spread over ``steps`` sampler steps (inputs depend on the timestep)."""
    g = torch.Generator().manual_seed(seed)
    step = torch.arange(n) % steps
    t = (steps - 1 - step) * (1000 // steps) + 7
    x = torch.randn(n, 3, 5, 5, generator=g, dtype=D) * (1 + step[:, None, None, None] / steps)
    vstep = torch.arange(v) % steps
    vt = (steps - 1 - vstep) * (1000 // steps) + 7
    vx = torch.randn(v, 3, 5, 5, generator=g, dtype=D) * (1 + vstep[:, None, None, None] / steps)
    block = FakeQuantConv(cout=cout, bits=3, seed=seed).to(D)
    with torch.no_grad():  # start away from the FP weights, as a block with quantized inputs
        block.v.add_(torch.randn(block.v.shape, generator=g, dtype=D))
    ctx = block_context(block, x, t, step, vx, vt, vstep, iterations=20, batch_size=8)
    return block, ctx, CalibSet(x, t, step), CalibSet(vx, vt, vstep)


# --------------------------------------------------------------------------------------------
# known answers: an independent computation of dL_VAL/ds
# --------------------------------------------------------------------------------------------
def reference_grad_s(block, ctx, s, idx, groups, tau, eta, objective, inner_step, reduction,
                     gm_weight=1.0):
    """d L_VAL / d s by autograd through the softmax, the unrolled step (create_graph) and the
    group gradients with respect to the weights, written from the method's description: no use
    of gac.py."""
    s = s.detach().clone().requires_grad_(True)
    w = torch.softmax(s / tau, 0)
    N, B = s.shape[0], idx.shape[0]
    theta = {k: p.detach().clone().requires_grad_(True) for k, p in block.named_parameters()}

    def losses(params, inputs, targets):
        return per_sample_loss(functional_call(block, params, inputs), targets, reduction)

    w_b = w[idx]
    inner = (N * w_b * losses(theta, ctx.calib_inputs(idx), ctx.calib_targets(idx))).mean()
    grads = torch.autograd.grad(inner, list(theta.values()), create_graph=True)
    if inner_step == "normalized":
        flat = torch.cat([gk.reshape(-1) for gk in grads])
        eta = eta / flat.pow(2).mean().sqrt().detach()
    theta_p = {k: v - eta * gk for (k, v), gk in zip(theta.items(), grads)}
    group_losses = [losses(theta_p, ctx.val_inputs(gi), ctx.val_targets(gi)).mean()
                    for gi in groups]
    g = [torch.autograd.grad(la, w_b, create_graph=True)[0] for la in group_losses]
    sizes = torch.tensor([len(gi) for gi in groups], dtype=D)
    l_mse = sum(la * n for la, n in zip(group_losses, sizes)) / sizes.sum()
    G = len(groups)
    pairs = [(a, b) for a in range(G) for b in range(a + 1, G)]
    if objective == "cosine":
        sim = [torch.dot(g[a], g[b]) / (g[a].norm() * g[b].norm()) for a, b in pairs]
        l_val = gm_weight * -sum(sim) / len(pairs) + torch.log(l_mse)
    else:
        l_val = gm_weight * -sum(torch.dot(g[a], g[b]) for a, b in pairs) / len(pairs) + l_mse
    (grad_s,) = torch.autograd.grad(l_val, s)
    return grad_s


@pytest.mark.parametrize("objective,inner_step,reduction,jacobian,mode", [
    ("cosine", "normalized", "channel_sum", "materialise", "reverse"),
    ("cosine", "normalized", "mean", "linearise", "forward"),
    ("cosine", "sgd", "channel_sum", "linearise", "reverse"),
    ("dot", "sgd", "channel_sum", "materialise", "forward"),
])
def test_meta_gradient_matches_an_independent_autograd_computation(objective, inner_step,
                                                                   reduction, jacobian, mode):
    block, ctx, _, _ = make_problem()
    ctx.loss_reduction = reduction  # as the reconstruction loop sets it
    groups = timestep_groups(ctx.val_step, 4)
    idx = torch.tensor([0, 2, 3, 7, 11, 12, 17, 23])
    tau = 0.7
    s = 0.3 * torch.randn(24, generator=torch.Generator().manual_seed(3), dtype=D)
    eta = 1e-3 if inner_step == "normalized" else 0.02
    expected = reference_grad_s(block, ctx, s, idx, groups, tau, eta, objective, inner_step,
                                reduction)
    w = torch.softmax(s / tau, 0)
    res = meta_gradient(ctx, ctx.params, w, idx, groups, eta=eta, mode=mode, jacobian=jacobian,
                        objective=objective, inner_step=inner_step)
    full = torch.zeros(24, dtype=D).index_put_((idx,), res.grad_w)
    got = softmax_backward(w, full, tau)
    rel = float((got - expected).norm() / expected.norm())
    assert rel < 1e-8, rel
    # the parts add up, and the gradient-matching part is not negligible here
    torch.testing.assert_close(res.grad_mse + res.grad_gm, res.grad_w)
    assert res.gm_share() > 0.05


def test_per_sample_loss_is_the_reconstruction_loops():
    _, ctx, _, _ = make_problem()
    idx = torch.arange(6)
    f = gac.loss_vector_fn(ctx, ctx.calib_inputs(idx), ctx.calib_targets(idx), None)
    out = ctx.forward(ctx.params, ctx.calib_inputs(idx))
    target = ctx.calib_targets(idx)
    # no reduction named: the loop's default (BRECQ's channel sum)
    torch.testing.assert_close(f(ctx.params), per_sample_loss(out, target, "channel_sum"))
    ctx.loss_reduction = "mean"
    f = gac.loss_vector_fn(ctx, ctx.calib_inputs(idx), ctx.calib_targets(idx), None)
    torch.testing.assert_close(f(ctx.params), per_sample_loss(out, target, "mean"))


def test_cosine_objective_does_not_depend_on_the_loss_scale():
    # scaling every target and input by a constant scales the losses; the cosine objective's
    # meta-gradient direction (all that the per-block normalised update sees) stays the same
    block, ctx, _, _ = make_problem()
    groups = timestep_groups(ctx.val_step, 4)
    idx = torch.arange(0, 24, 3)
    w = torch.full((24,), 1 / 24, dtype=D)
    kw = dict(eta=0.05, inner_step="normalized", mode="reverse", jacobian="materialise")
    a = meta_gradient(ctx, ctx.params, w, idx, groups, **kw)
    scaled = dataclasses.replace(ctx, forward=lambda p, x: 10.0 * ctx.forward(p, x),
                                 calib_targets=lambda i: 10.0 * ctx.calib_targets(i),
                                 val_targets=lambda i: 10.0 * ctx.val_targets(i))
    b = meta_gradient(scaled, ctx.params, w, idx, groups, **kw)
    torch.testing.assert_close(b.grad_w / b.grad_w.norm(), a.grad_w / a.grad_w.norm())
    torch.testing.assert_close(b.gm_share(), a.gm_share())
    d1 = meta_gradient(ctx, ctx.params, w, idx, groups, **dict(kw, objective="dot"))
    d2 = meta_gradient(scaled, ctx.params, w, idx, groups, **dict(kw, objective="dot"))
    assert not torch.allclose(d2.gm_share(), d1.gm_share(), rtol=0.1)  # the old mix did


# --------------------------------------------------------------------------------------------
# no visit-order artefact
# --------------------------------------------------------------------------------------------
def _fake_meta(monkeypatch, make_grad, visits):
    """meta_gradient replaced by a given per-sample meta-gradient; records the visit order."""
    def fake(ctx, params, w, idx, groups, **kw):
        visits.append(idx.clone())
        g = make_grad(idx).to(w.dtype)
        z = torch.zeros((), dtype=w.dtype)
        return MetaResult(g, z, z, torch.zeros(len(groups), dtype=w.dtype), g,
                          torch.zeros_like(g))
    monkeypatch.setattr(plugin, "meta_gradient", fake)


def _learn(n, seed, **opts):
    _, ctx, calib, val = make_problem(n=n, v=20)
    gw = GradientAligned(seed=seed, **opts)
    gw.prepare(calib, val, CTX)
    gw.begin_block(ctx)
    return gw.weights(torch.arange(n))


def test_equal_meta_gradients_keep_uniform_weights_whatever_the_order(monkeypatch):
    _fake_meta(monkeypatch, lambda idx: torch.full((len(idx),), 3e-7), [])
    for seed in (0, 1, 2):  # three visit orders
        w = _learn(1000, seed, meta_batch_size=64)  # 16 meta steps, a ragged last batch
        assert float((w - 1).abs().max()) < 1e-3
    # the optimiser before issue 12 (Adam on all logits) fails this test
    w = _learn(1000, 0, meta_batch_size=64, meta_optimizer="adam")
    assert float((w - 1).abs().max()) > 0.05


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra = torch.argsort(torch.argsort(a)).double()
    rb = torch.argsort(torch.argsort(b)).double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float(ra @ rb / (ra.norm() * rb.norm()))


@pytest.mark.parametrize("seed", [0, 1])
def test_weights_do_not_correlate_with_visit_step_on_random_data(monkeypatch, seed):
    n = 2048
    noise = torch.randn(n, generator=torch.Generator().manual_seed(10 + seed))
    visits: list = []
    _fake_meta(monkeypatch, lambda idx: noise[idx] * 1e-9, visits)
    w = _learn(n, seed, meta_batch_size=64)
    step_of = torch.empty(n)
    for k, idx in enumerate(visits):
        step_of[idx[:min(len(idx), n - 64 * k)]] = k
    rho = _spearman(step_of, w)
    assert abs(rho) < 4 / n ** 0.5, rho  # 4 standard errors of a null correlation
    assert _spearman(-noise, w) > 0.9  # the weights did follow the meta-gradients


def test_every_sample_is_updated_once_per_pass(monkeypatch):
    visits: list = []
    _fake_meta(monkeypatch, lambda idx: torch.ones(len(idx)), visits)
    _learn(100, 0, meta_batch_size=32)  # 4 steps: 32, 32, 32, 4 fresh + 28 refilled
    assert [len(v) for v in visits] == [32, 32, 32, 32]
    fresh = torch.cat([v[:min(32, 100 - 32 * k)] for k, v in enumerate(visits)])
    assert sorted(fresh.tolist()) == list(range(100))


# --------------------------------------------------------------------------------------------
# behaviour with the defaults
# --------------------------------------------------------------------------------------------
def corrupted_problem(bad_steps=(4, 5)):
    """Calibration targets of two adjacent sampler steps (one timestep group of the default 5)
    are corrupted so that their loss gradients point against the clean ones:
    target = q0 + (q0 - fp), with q0 the quantized block's initial output (clean: the FP
    output)."""
    block, ctx, calib, val = make_problem(n=200, v=40, cout=6)
    with torch.no_grad():
        idx = torch.arange(200)
        q0 = ctx.forward(ctx.params, ctx.calib_inputs(idx))
        fp = ctx.calib_targets(idx)
        bad = torch.isin(calib.step, torch.tensor(bad_steps))
        targets = torch.where(bad[:, None, None, None], 2 * q0 - fp, fp)
    # GAC learns a block's weights in its first phase, AdaRound's: only the rounding
    # parameters are trained there (the step sizes come in the activation phase)
    ctx = dataclasses.replace(ctx, calib_targets=lambda i: targets[i],
                              params={"v": ctx.params["v"]})
    return ctx, calib, val, bad


def test_a_corrupted_group_is_down_weighted_with_the_defaults():
    ctx, calib, val, bad = corrupted_problem()
    gw = GradientAligned()  # the defaults (only the seed is the test context's)
    gw.prepare(calib, val, CTX)
    gw.begin_block(ctx)
    w = gw.weights(torch.arange(len(calib)))
    clean = torch.stack([w[calib.step == s].mean() for s in range(10)
                         if not bad[calib.step == s].any()])
    bad_mean = w[bad].mean()
    assert bad_mean < 0.8 and bad_mean < clean.min() - 0.15, (bad_mean, clean)
    gw.end_block(ctx)
    rec = gw.state()["blocks"]["fake"]
    assert rec["weight_by_step"][4] < 0.8 and rec["objective"] == "cosine"
    assert rec["gm_share"] > 0


def test_record_carries_the_gm_share_per_block():
    _, ctx, calib, val = make_problem(n=48)
    gw = GradientAligned(meta_batch_size=16)
    gw.prepare(calib, val, CTX)
    gw.begin_block(ctx)
    gw.end_block(ctx)
    rec = gw.state()["blocks"]["fake"]
    assert rec["meta_steps"] == 3
    assert 0 < rec["gm_share_min"] <= rec["gm_share"] <= rec["gm_share_max"]
    assert -1 <= rec["cos_full_mse"] <= 1
    assert rec["loss_reduction"] == "channel_sum" and rec["meta_optimizer"] == "sgd"
    # no gradient matching: share 0, and the full meta-gradient is the MSE part
    off = GradientAligned(meta_batch_size=16, gm_weight=0.0)
    off.prepare(calib, val, CTX)
    off.begin_block(ctx)
    off.end_block(ctx)
    rec = off.state()["blocks"]["fake"]
    assert rec["gm_share"] == 0 and rec["cos_full_mse"] == pytest.approx(1.0)


def test_a_non_finite_meta_gradient_never_reaches_the_weights(monkeypatch):
    """A meta step whose gradient overflowed (seen on conv_in on the GPU: every weight became
    NaN and the quantized model with it) is skipped and counted; the weights stay finite."""
    import ptqbench_plugins.weightings.gradient_aligned as ga

    real = ga.meta_gradient
    calls = {"n": 0}

    def sometimes_nan(*args, **kwargs):
        res = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2:
            res.grad_mse = res.grad_mse * float("nan")
            res.grad_w = res.grad_w * float("nan")
        return res

    monkeypatch.setattr(ga, "meta_gradient", sometimes_nan)
    _, ctx, calib, val = make_problem(n=48)
    gw = GradientAligned(meta_batch_size=16, cuda_graph=False)
    gw.prepare(calib, val, CTX)
    gw.begin_block(ctx)
    gw.end_block(ctx)
    rec = gw.state()["blocks"]["fake"]
    assert calls["n"] == 3 and rec["meta_steps_not_finite"] == 1
    w = gw.weights(torch.arange(48))
    assert torch.isfinite(w).all() and abs(float(w.mean()) - 1) < 1e-5


# --------------------------------------------------------------------------------------------
# the collapse behind the NaN weights of conv_in (cifar10-ddpm-s; benchmarks/gac_trace.py)
# --------------------------------------------------------------------------------------------
# Traced on CPU with benchmarks/gac_trace.py (the GPU cells' NaN weights on the same block fit
# it): a meta batch whose meta-gradient was ~100x the block's first one (the cosine's
# gradient grows as 1/|p_a| when a validation group's projected gradient is small) moved
# logits by ~100 under the first step's scale, so one sample took ~60% of the weight; a later
# batch of samples left with weights ~1e-27 then made the normalized inner step
# eta / |step| overflow, and 68 of the 80 meta-gradients were inf/NaN.
def test_one_outlier_meta_step_cannot_collapse_the_weights(monkeypatch):
    n = 640
    noise = torch.randn(n, generator=torch.Generator().manual_seed(3))
    calls = {"k": 0}

    def grad(idx):
        calls["k"] += 1
        g = noise[idx] * 1e-9
        if calls["k"] == 3:  # one sample of the third batch: 1000x the others
            g = g.clone()
            g[0] = -1e-6
        return g

    _fake_meta(monkeypatch, grad, [])
    w = _learn(n, 0, meta_batch_size=64)
    assert torch.isfinite(w).all()
    assert 0.4 < float(w.min()) and float(w.max()) < 2.5, (w.min(), w.max())
    # the block's first step's scale without clipping (before) handed that one sample most of
    # the weight
    calls["k"] = 0
    w_first = _learn(n, 0, meta_batch_size=64, normalize_meta_grad="first", meta_clip=0)
    assert float(w_first.max()) > 0.5 * n


def test_a_batch_without_weight_takes_no_inner_step():
    """Weights of a meta batch that all underflowed to 0: the normalized inner step has no
    direction, so it is no step (it was eta / tiny, and the meta-gradient overflowed)."""
    _, ctx, calib, val = make_problem(n=24)
    groups = timestep_groups(val.step, 5)
    w = torch.zeros(24, dtype=D)
    w[16:] = 1 / 8
    res = meta_gradient(ctx, ctx.params, w, torch.arange(8), groups, eta=1e-3,
                        inner_step="normalized", mode="reverse", jacobian="materialise")
    assert torch.isfinite(res.l_mse)
    # no step, so nothing to learn about this batch (before: ~1e300 in float64, inf in float32)
    assert torch.count_nonzero(res.grad_w) == 0, res.grad_w


def test_a_vanishing_group_gradient_gives_a_finite_cosine_gradient():
    p = torch.tensor([[1.0, 2.0, 0.5], [0.0, 0.0, 0.0], [-1.0, 0.3, 2.0]], dtype=D)
    l_gm, d = gac._gm_direction(p, "cosine", 1 / 3, 1.0)
    assert torch.isfinite(l_gm) and torch.isfinite(d).all()
    assert torch.equal(d[1], torch.zeros(3, dtype=D))  # no direction: no gradient
