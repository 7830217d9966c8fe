"""Reconstruction data flow: which model feeds each phase, held-out checks, keep-better.

The reference methods (BRECQ, Q-Diffusion) feed the weight phase from the quantized model with
every activation quantizer off and the activation phase from the FP model; these tests check the
inputs a phase really sees against a hooked forward of the right model.
"""
from pathlib import Path

import pytest
import torch

from ptqbench.errors import PtqbenchError
from ptqbench.interfaces import RunContext, Weighting
from ptqbench.quant import QuantRecipe, calibrate_activation_ranges, quantize_model
from ptqbench.quant.context import sampler_step
from ptqbench.quant.lsq import ActQuantizer
from ptqbench.quant.reconstruction import (activations_off, holdout_split, needed_streams,
                                           phase_streams)
from ptqbench.quant.recon_options import ReconConfig
from ptqbench.quant.testing import UNetAdapter, UniformWeights, random_calib, tiny_unet
from ptqbench_plugins.reconstructors.brecq import BRECQ
from ptqbench_plugins.reconstructors.fbr import FBR

UNITS = ["conv_in", "down_blocks.0.resnets.0", "down_blocks.0.downsamplers.0",
         "down_blocks.1.resnets.0"]
FAST = dict(iters_w=20, iters_a=10, batch_size=8, forward_batch_size=16, eval_samples=16,
            log_every=10, checkpoint=False)


@pytest.fixture(scope="module")
def unet():
    return tiny_unet()


def _setup(unet, bits="W4A8", n=32):
    adapter = UNetAdapter(unet, only=UNITS)
    recipe = QuantRecipe.from_options(bits=bits, weight_init="minmax", act_init="minmax")
    q, _ = quantize_model(unet, recipe, adapter)
    calib = random_calib(n)
    calibrate_activation_ranges(q, adapter, calib, 16, "cpu")
    return adapter, q, calib


def _ctx(tmp_path):
    return RunContext(device=torch.device("cpu"), seed=0, work_dir=Path(tmp_path),
                      cache_dir=Path(tmp_path))


def _hooked_inputs(model, adapter, calib, name):
    """First positional input of unit ``name`` in a plain forward of ``model``."""
    seen = {}
    module = model.get_submodule(name)
    h = module.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0].detach()))
    try:
        with torch.no_grad(), sampler_step(calib.step):
            adapter.denoise(model, calib.x, calib.t)
    finally:
        h.remove()
    return seen["x"]


class InputProbe(Weighting):
    """Uniform weights; at every phase start, compares the phase's block inputs with a hooked
    forward of the model the reference methods feed that phase from."""

    name = "input-probe"

    def __init__(self, qmodel, fp_model, adapter, calib):
        super().__init__()
        self.q, self.fp, self.adapter, self.calib = qmodel, fp_model, adapter, calib
        self.checked: list[tuple[str, str, float, float]] = []

    def weights(self, idx):
        return None

    def begin_block(self, ctx):
        name = ctx.block.name
        if name == "conv_in":
            return  # its input is x itself on every stream
        idx = torch.arange(len(self.calib))
        got = ctx.calib_inputs(idx)[0]
        with activations_off(self.q):
            weights_only = _hooked_inputs(self.q, self.adapter, self.calib, name)
        full = _hooked_inputs(self.q, self.adapter, self.calib, name)
        fp = _hooked_inputs(self.fp, self.adapter, self.calib, name)
        want = weights_only if ctx.phase == "weights" else fp
        other = full if ctx.phase == "weights" else weights_only
        self.checked.append((name, ctx.phase, float((got - want).abs().max()),
                             float((got - other).abs().max())))


def test_weight_phase_reads_the_weights_only_model_and_activation_phase_the_fp_model(
        unet, tmp_path):
    adapter, q, calib = _setup(unet)
    probe = InputProbe(q, unet, adapter, calib)
    BRECQ(**FAST).reconstruct(unet, q, adapter, calib, None, probe, _ctx(tmp_path))
    phases = {(n, p) for n, p, *_ in probe.checked}
    assert ("down_blocks.1.resnets.0", "weights") in phases
    assert ("down_blocks.1.resnets.0", "activations") in phases
    for name, phase, err_right, err_other in probe.checked:
        assert err_right < 1e-5, (name, phase, err_right)
        assert err_other > 1e-4, (name, phase, err_other)  # the streams really differ


def test_activations_off_passes_through_and_restores_each_state(unet):
    _, q, _ = _setup(unet)
    quantizers = [m for m in q.modules() if isinstance(m, ActQuantizer)]
    quantizers[0].enabled = False  # a quantizer a recipe left off stays off afterwards
    with activations_off(q):
        assert not any(m.enabled for m in quantizers)
    assert [m.enabled for m in quantizers] == [False] + [True] * (len(quantizers) - 1)


def test_holdout_is_stratified_by_sampler_step_and_disjoint():
    step = torch.arange(200) // 20  # step-major, 10 steps x 20 samples
    train, hold = holdout_split(step, 0.1, seed=3)
    assert len(set(train.tolist()) & set(hold.tolist())) == 0
    assert sorted(train.tolist() + hold.tolist()) == list(range(200))
    assert torch.bincount(step[hold], minlength=10).tolist() == [2] * 10
    again = holdout_split(step, 0.1, seed=3)[1]
    assert torch.equal(hold, again)
    assert holdout_split(step, 0.0, seed=3)[1] is None


def test_reference_defaults_and_the_streams_each_phase_reads():
    brecq = BRECQ().config
    assert (brecq.weight_input, brecq.act_input) == ("weights_only", "fp")
    assert phase_streams(brecq)["weights"] == "qw" and needed_streams(brecq) == ("fp", "qw")
    fbr = FBR().config
    assert fbr.mode == "joint" and fbr.joint_input == "quantized"
    assert needed_streams(fbr) == ("fp", "q")
    old = ReconConfig(weight_input="quantized", act_input="quantized")
    assert needed_streams(old) == ("fp", "q")


def test_the_old_input_source_option_says_what_replaced_it():
    with pytest.raises(PtqbenchError, match="weight_input.*act_input.*joint_input"):
        BRECQ(input_source="quantized")
    with pytest.raises(PtqbenchError, match="act_input"):
        BRECQ(act_input="int8")


def _scales(q):
    return [m.scale.detach().clone() for m in q.modules() if isinstance(m, ActQuantizer)]


def test_an_activation_phase_that_raises_the_held_out_loss_is_undone(unet, tmp_path):
    # an absurd step-size learning rate wrecks the ranges: keep_better must restore them
    # (act_reinit none: the step sizes the phase starts from are then the ones made before
    # reconstruction, so "restored" can be checked against them)
    wreck = {**FAST, "iters_w": 0, "iters_a": 30, "lr_a": 0.5, "lr_a_schedule": "constant",
             "act_reinit": "none",
             "holdout": 0.25}
    adapter, q, calib = _setup(unet)
    initial = _scales(q)
    res = BRECQ(**wreck).reconstruct(unet, q, adapter, calib, None, UniformWeights(),
                                     _ctx(tmp_path / "a"))
    phases = [p for b in res["blocks"] for p in b["phases"] if p["phase"] == "activations"]
    assert phases and res["holdout_samples"] == 8
    undone = [p for p in phases if p["kept"] == "initial"]
    assert undone, phases
    for p in undone:
        assert p["holdout_mse_after"] > p["holdout_mse_before"] == p["holdout_mse_kept"]
    for p in phases:
        if p["kept"] == "learned":
            assert p["holdout_mse_after"] <= p["holdout_mse_before"]
    if len(undone) == len(phases):
        assert all(torch.equal(a, b) for a, b in zip(_scales(q), initial))

    adapter, q2, calib = _setup(unet)
    res2 = BRECQ(**wreck, keep_better=False).reconstruct(
        unet, q2, adapter, calib, None, UniformWeights(), _ctx(tmp_path / "b"))
    phases2 = [p for b in res2["blocks"] for p in b["phases"] if p["phase"] == "activations"]
    assert all(p["kept"] == "learned" for p in phases2)
    assert any(p["holdout_mse_after"] > p["holdout_mse_before"] for p in phases2)


def test_act_reinit_after_weights_sets_ranges_from_the_activation_phase_inputs(unet, tmp_path):
    assert ReconConfig().act_reinit == "after_weights"  # the references' default
    adapter, q, calib = _setup(unet)
    before = _scales(q)
    res = BRECQ(**{**FAST, "iters_a": 0, "act_reinit": "none"}).reconstruct(
        unet, q, adapter, calib, None, UniformWeights(), _ctx(tmp_path))
    # no activation phase and no re-initialisation: the ranges made before reconstruction stay
    assert all(torch.equal(a, b) for a, b in zip(_scales(q), before))
    adapter, q, calib = _setup(unet)
    res = BRECQ(**{**FAST, "iters_a": 0, "act_reinit": "after_weights"}).reconstruct(
        unet, q, adapter, calib, None, UniformWeights(), _ctx(tmp_path / "n"))
    # no step-size phase (iters_a = 0): the ranges are still made again on the final weights,
    # as the references initialise them whether or not they learn step sizes afterwards
    assert any(not torch.allclose(a, b) for a, b in zip(_scales(q), before))
    train = 32 - res["holdout_samples"]  # fewer than 64: every training sample
    assert all(b.get("act_reinit_samples") == train for b in res["blocks"])
    adapter, q, calib = _setup(unet)
    res = BRECQ(**{**FAST, "iters_a": 1, "lr_a": 1e-12, "act_reinit": "after_weights",
                   "keep_better": False}).reconstruct(
        unet, q, adapter, calib, None, UniformWeights(), _ctx(tmp_path / "r"))
    assert [p["phase"] for p in res["blocks"][1]["phases"]] == ["weights", "activations"]
    after = _scales(q)
    assert any(not torch.allclose(a, b) for a, b in zip(after, before))
    assert all(torch.isfinite(a).all() and (a > 0).all() for a in after)


def test_lp_loss_per_sample_is_summed_over_channels_and_averaged_over_positions():
    from ptqbench.quant.reconstruction import per_sample_loss
    out = torch.tensor([[[[1.0, -2.0]], [[0.5, 0.0]]]])  # (1, 2 channels, 1, 2)
    target = torch.zeros_like(out)
    # p = 2: position 0: 1 + 0.25, position 1: 4 + 0 -> mean 2.625
    assert per_sample_loss(out, target, "channel_sum").item() == pytest.approx(2.625)
    # p = 2.4 (BRECQ / Q-Diffusion's step-size loss): |e|^2.4 by hand
    lp = ((1.0 + 0.5 ** 2.4) + 2.0 ** 2.4) / 2
    assert per_sample_loss(out, target, "channel_sum", 2.4).item() == pytest.approx(lp)
    assert per_sample_loss(out, target, "mean", 2.4).item() == pytest.approx(
        (1.0 + 2.0 ** 2.4 + 0.5 ** 2.4) / 4)


def test_activation_phase_uses_its_own_loss_exponent_and_a_64_sample_reinit(unet, tmp_path,
                                                                            monkeypatch):
    from ptqbench.quant import reconstruction as rec
    seen, reinit = [], []
    real_loss, real_reinit = rec.per_sample_loss, rec._reinit_act_ranges
    monkeypatch.setattr(rec, "per_sample_loss",
                        lambda o, t, r, p=2.0: seen.append(p) or real_loss(o, t, r, p))
    monkeypatch.setattr(rec, "_reinit_act_ranges",
                        lambda runner, cache, stream, idx, recipe, seed:
                        reinit.append(len(idx)) or real_reinit(runner, cache, stream, idx,
                                                               recipe, seed))
    adapter, q, calib = _setup(unet, n=96)
    cfg = {**FAST, "iters_w": 3, "iters_a": 3, "keep_better": False, "holdout": 0.0}
    BRECQ(**cfg, act_reinit_samples=40).reconstruct(unet, q, adapter, calib, None,
                                                    UniformWeights(), _ctx(tmp_path))
    assert set(seen) == {2.0, 2.4}  # weights: p = 2; activations: the default 2.4
    assert reinit and set(reinit) == {40}
    seen.clear(), reinit.clear()
    adapter, q, calib = _setup(unet, n=96)
    BRECQ(**cfg, act_loss_p=2.0, act_reinit_samples=0).reconstruct(
        unet, q, adapter, calib, None, UniformWeights(), _ctx(tmp_path / "b"))
    assert set(seen) == {2.0} and set(reinit) == {96}  # 0 = every training sample


def test_reinit_indices_are_a_seeded_sorted_subset_of_the_training_samples():
    from ptqbench.quant.reconstruction import _reinit_indices
    train = torch.arange(0, 200, 2)
    a, b = _reinit_indices(train, 64, 7), _reinit_indices(train, 64, 7)
    assert torch.equal(a, b) and len(a) == 64 and len(a.unique()) == 64
    assert torch.equal(a, a.sort().values) and set(a.tolist()) <= set(train.tolist())
    assert not torch.equal(a, _reinit_indices(train, 64, 8))
    assert torch.equal(_reinit_indices(train, 0, 7), train)
    assert torch.equal(_reinit_indices(train, 500, 7), train)
    # per-step activation parameters: n samples of every sampler step
    step = torch.arange(200) // 20  # 10 steps, step-major
    per = _reinit_indices(train, 4, 7, step)
    assert len(per) == 40 and torch.bincount(step[per], minlength=10).tolist() == [4] * 10


def test_reference_options_are_checked():
    with pytest.raises(PtqbenchError, match="act_loss_p must be > 0"):
        BRECQ(act_loss_p=0)
    with pytest.raises(PtqbenchError, match="act_reinit_samples must be an integer >= 0"):
        BRECQ(act_reinit_samples=-1)
