"""Reconstruction loop: block cache, weighted loss, BlockContext, MSE vs RTN, kill-and-resume."""
from pathlib import Path

import pytest
import torch

from ptqbench.errors import PtqbenchError
from ptqbench.interfaces import RunContext, Weighting
from ptqbench.quant import QuantRecipe, calibrate_activation_ranges, quantize_model
from ptqbench.quant.block_cache import BlockCache, TensorStore, discover
from ptqbench.quant.context import sampler_step
from ptqbench.quant.model import quant_layers
from ptqbench.quant.reconstruction import per_sample_loss, weighted_loss
from ptqbench.quant.testing import UNetAdapter, UniformWeights, random_calib, tiny_unet
from ptqbench_plugins.reconstructors.adaround import AdaRound
from ptqbench_plugins.reconstructors.brecq import BRECQ
from ptqbench_plugins.reconstructors.fbr import FBR
from ptqbench_plugins.reconstructors.none import NoReconstruction

FEW = ["time_embedding", "conv_in", "down_blocks.0.resnets.0", "down_blocks.0.downsamplers.0",
       "down_blocks.1.resnets.0", "down_blocks.1.attentions.0"]
FAST = dict(iters_w=30, iters_a=10, batch_size=8, forward_batch_size=16, eval_samples=16,
            log_every=10)


@pytest.fixture(scope="module")
def unet():
    return tiny_unet()


def _setup(unet, bits="W4A8", only=FEW, n=16, **recipe_opts):
    adapter = UNetAdapter(unet, only=only)
    recipe = QuantRecipe.from_options(bits=bits, weight_init="minmax", act_init="minmax",
                                      **recipe_opts)
    q, _ = quantize_model(unet, recipe, adapter)
    calib = random_calib(n)
    calibrate_activation_ranges(q, adapter, calib, 16, "cpu")
    return adapter, q, calib


def _ctx(tmp_path, seed=0):
    return RunContext(device=torch.device("cpu"), seed=seed, work_dir=Path(tmp_path),
                      cache_dir=Path(tmp_path))


def test_weighted_loss_with_uniform_weights_equals_unweighted_exactly():
    per = torch.rand(32) * 3
    assert torch.equal(weighted_loss(per, torch.ones(32)), weighted_loss(per, None))
    assert torch.equal(weighted_loss(per, None), per.mean())
    out, tgt = torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5)
    ps = per_sample_loss(out, tgt, "channel_sum")
    assert torch.allclose(ps, (out - tgt).pow(2).sum(1).mean((1, 2)))
    assert torch.allclose(per_sample_loss(out, tgt, "mean"), (out - tgt).pow(2).mean((1, 2, 3)))


def test_replayed_block_inputs_equal_a_hooked_full_forward(unet):
    """Inputs produced from cached outputs + glue equal those of the real network."""
    adapter = UNetAdapter(unet)
    blocks = {b.name: b.module for b in adapter.blocks(unet)}
    calib = random_calib(6)

    def run(model, batch):
        with sampler_step(batch.step):
            return adapter.denoise(model, batch.x, batch.t)

    infos = discover(unet, blocks, run, calib, "cpu")
    assert [i.name for i in infos] == list(blocks)  # the adapter's order is the call order
    by = {i.name: i for i in infos}
    assert by["up_blocks.1.resnets.1"].producers >= {by["conv_in"].order,
                                                     by["time_embedding"].order}
    seen = {}
    hooks = [m.register_forward_pre_hook(
        lambda m, a, k, _n=n: seen.setdefault(_n, (a, k)), with_kwargs=True)
        for n, m in blocks.items()]
    with torch.no_grad():
        unet(calib.x, calib.t)
    for h in hooks:
        h.remove()
    cache = BlockCache(infos, calib, TensorStore("cpu"), 4, run, ("fp",))
    for info in infos:
        cache.capture_inputs(info.order, "fp", unet, blocks)
        leaves = cache.input_leaves("fp", torch.arange(6))
        args, kwargs = cache.call_args(info.order, leaves)
        ref_args, ref_kwargs = seen[info.name]
        for a, r in zip(args, ref_args):
            if isinstance(r, torch.Tensor):
                assert torch.allclose(a, r, atol=1e-6), info.name
        for k, r in ref_kwargs.items():
            if isinstance(r, torch.Tensor):
                assert torch.allclose(kwargs[k], r, atol=1e-6), info.name
        cache.compute_outputs(info.order, "fp", blocks[info.name])
        cache.drop_inputs()
        cache.free_dead(info.order)
    assert not cache.streams["fp"].outputs  # everything freed after the last block


def test_brecq_lowers_block_output_mse_vs_rtn_weights_only(unet, tmp_path):
    adapter, q, calib = _setup(unet, bits="W4A16", n=32)
    res = BRECQ(**{**FAST, "iters_w": 80}).reconstruct(
        unet, q, adapter, calib, None, UniformWeights(), _ctx(tmp_path))
    blocks = res["blocks"]
    assert [b["name"] for b in blocks] == FEW
    for b in blocks:
        assert b["mse_after"] < b["mse_before"], b["name"]
        assert b["seconds"] > 0 and "host_peak_rss_bytes" in b
        assert [p["phase"] for p in b["phases"]] == ["weights"]


def test_brecq_lowers_block_output_mse_vs_rtn_w4a8(unet, tmp_path):
    adapter, q, calib = _setup(unet, n=32)
    res = BRECQ(**{**FAST, "iters_w": 80, "iters_a": 40}).reconstruct(
        unet, q, adapter, calib, None, UniformWeights(), _ctx(tmp_path))
    blocks = res["blocks"]
    assert sum(b["mse_after"] for b in blocks) < sum(b["mse_before"] for b in blocks)
    for b in blocks:
        assert [p["phase"] for p in b["phases"]] == ["weights", "activations"]
    # everything ends folded into integer codes: no soft variables, no FP weight copies
    for _, layer in quant_layers(q):
        for wq in layer.weight_quantizers:
            assert wq.form == "folded"
    assert not any("alpha" in k or "w_floor" in k for k in q.state_dict())


class Recorder(Weighting):
    """Checks BlockContext and the calls the loop makes; optionally returns all-ones weights."""

    def __init__(self, ones=False):
        super().__init__()
        self.ones, self.begun, self.observed, self.ended = ones, [], 0, 0

    def begin_block(self, ctx):
        self.begun.append((ctx.block.name, ctx.phase))
        idx = torch.arange(4)
        inputs = ctx.calib_inputs(idx)
        out_loop = ctx.block.module(*inputs[:1], *inputs[1:]) if ctx.block.name == "conv_in" \
            else None
        out = ctx.forward(ctx.params, inputs)
        assert out.shape == ctx.calib_targets(idx).shape
        if out_loop is not None:
            assert torch.equal(out, out_loop)
        if ctx.params:
            # differentiable through params: a one-step unrolled update as GAC does
            name, p = next(iter(ctx.params.items()))
            g = torch.autograd.grad(ctx.forward(ctx.params, inputs).pow(2).mean(), p,
                                    create_graph=True)[0]
            out2 = ctx.forward({**ctx.params, name: p - 0.1 * g}, inputs)
            assert out2.requires_grad
        vi = ctx.val_inputs(torch.arange(2))
        assert ctx.val_targets(torch.arange(2)).shape[0] == 2 and len(vi) >= 1
        assert ctx.calib_step.shape == ctx.calib_t.shape

    def weights(self, idx):
        return torch.ones(len(idx)) if self.ones else None

    def observe(self, iteration, idx, per_sample_loss, ctx):
        assert per_sample_loss.shape == idx.shape and not per_sample_loss.requires_grad
        self.observed += 1

    def end_block(self, ctx):
        self.ended += 1


def test_block_context_and_uniform_weights_equal_no_weights(unet, tmp_path):
    only = FEW[:4]
    states = []
    for ones in (False, True):
        adapter, q, calib = _setup(unet, only=only)
        val = random_calib(6, seed=1)
        rec = Recorder(ones)
        BRECQ(**FAST, checkpoint=False).reconstruct(unet, q, adapter, calib, val, rec,
                                                    _ctx(tmp_path / str(ones)))
        assert rec.begun[0] == ("time_embedding", "weights")
        assert rec.observed == len(only) * (FAST["iters_w"] + FAST["iters_a"])
        assert rec.ended == len(rec.begun) == 2 * len(only)
        states.append(q.state_dict())
    for k, v in states[0].items():
        assert torch.equal(v, states[1][k]), k


class Killer(UniformWeights):
    def __init__(self, after):
        super().__init__()
        self.after, self.blocks = after, set()

    def begin_block(self, ctx):
        self.blocks.add(ctx.block.name)
        if len(self.blocks) > self.after:
            raise KeyboardInterrupt("simulated kill")


def test_kill_and_resume_equals_uninterrupted(unet, tmp_path):
    only = FEW[:5]
    opts = {**FAST, "iters_w": 10, "iters_a": 5}
    adapter, q_ref, calib = _setup(unet, only=only)
    res_ref = BRECQ(**opts).reconstruct(unet, q_ref, adapter, calib, None, UniformWeights(),
                                        _ctx(tmp_path / "ref"))
    # killed while the third block starts: two blocks are checkpointed
    adapter, q1, calib = _setup(unet, only=only)
    with pytest.raises(KeyboardInterrupt):
        BRECQ(**opts).reconstruct(unet, q1, adapter, calib, None, Killer(2),
                                  _ctx(tmp_path / "run"))
    assert len(list((tmp_path / "run" / "reconstruction").glob("unit_*.pt"))) == 2
    # a fresh model/process state resumes from the checkpoint and skips the finished blocks
    adapter, q2, calib = _setup(unet, only=only)
    res = BRECQ(**opts).reconstruct(unet, q2, adapter, calib, None, UniformWeights(),
                                    _ctx(tmp_path / "run"))
    assert [b.get("resumed", False) for b in res["blocks"]] == [True, True, False, False, False]
    # nothing of the record is lost: the resumed blocks carry what the killed run measured
    from ptqbench.reproducible import differences
    assert differences({"reconstruction": res}, {"reconstruction": res_ref}, limit=20) == []
    assert all(b["phases"] and b["seconds"] > 0 for b in res["blocks"])
    ref = q_ref.state_dict()
    for k, v in q2.state_dict().items():
        assert torch.equal(v, ref[k]), k


def test_adaround_fbr_none_and_options(unet, tmp_path):
    adapter, q, calib = _setup(unet, only=FEW[:3], split_shortcut=True)
    res = AdaRound(**{**FAST, "iters_w": 5, "iters_a": 5}).reconstruct(
        unet, q, adapter, calib, None, UniformWeights(), _ctx(tmp_path / "a"))
    assert all(b["kind"] == "layer" for b in res["blocks"])
    assert len(res["blocks"]) == len(list(quant_layers(q)))
    adapter, q, calib = _setup(unet, only=FEW[:3])
    res = FBR(**{**FAST, "iters_w": 10}).reconstruct(unet, q, adapter, calib, None,
                                                     UniformWeights(), _ctx(tmp_path / "f"))
    assert [p["phase"] for p in res["blocks"][2]["phases"]] == ["joint"]
    adapter, q, calib = _setup(unet, only=FEW[:3])
    res = NoReconstruction().reconstruct(unet, q, adapter, calib, None, UniformWeights(),
                                         _ctx(tmp_path / "n"))
    assert res["folded_weight_quantizers"] == len(list(quant_layers(q)))
    with pytest.raises(PtqbenchError, match="iters_x"):
        BRECQ(iters_x=3)
    with pytest.raises(PtqbenchError, match="mode"):
        BRECQ(mode="parallel")
    with pytest.raises(PtqbenchError, match="granularity"):
        BRECQ(granularity="layer")
    with pytest.raises(PtqbenchError):
        NoReconstruction(iters_w=3)


def test_per_step_activation_params_reconstruct(unet, tmp_path):
    adapter, q, calib = _setup(unet, only=FEW[2:4], act_params="per_step", sampler_steps=4)
    res = BRECQ(**{**FAST, "iters_w": 5, "iters_a": 10}).reconstruct(
        unet, q, adapter, calib, None, UniformWeights(), _ctx(tmp_path))
    assert res["blocks"][0]["phases"][1]["params"]["step_sizes"] > 0


@pytest.mark.parametrize("opts", [{"iters_a": 0}, {"learn_act": False}])
def test_activation_quantizers_stay_on_without_an_activation_phase(unet, tmp_path, opts):
    # A weights-only reconstruction of a W4A8 model must still quantize activations afterwards:
    # the weight phase switches them off, and "without the activation phase" must mean
    # activations at their initial ranges, not FP activations.
    from ptqbench.quant.model import act_quantizers

    adapter, q, calib = _setup(unet, n=16)
    before = {name: aq.enabled for name, aq in act_quantizers(q)}
    assert any(before.values())
    res = BRECQ(**{**FAST, **opts}).reconstruct(unet, q, adapter, calib, None, UniformWeights(),
                                                _ctx(tmp_path))
    assert all([p["phase"] for p in b["phases"]] == ["weights"] for b in res["blocks"])
    assert {name: aq.enabled for name, aq in act_quantizers(q)} == before


@pytest.mark.parametrize("recipe", [{}, {"act_params": "per_step", "sampler_steps": 4}])
def test_gac_forms_per_sample_gradients_on_real_blocks(unet, tmp_path, recipe):
    # GAC's cheap path vmaps the block over single samples (through the block cache's gathers
    # and, per step, the activation parameters' indexing); on these blocks it must not need
    # the autodiff fallback, and both paths must give the same meta-gradient.
    from ptqbench.calib.gac import meta_gradient, timestep_groups
    from ptqbench_plugins.weightings.gradient_aligned import GradientAligned

    adapter, q, calib = _setup(unet, only=FEW[2:4], **recipe)
    val = random_calib(8, seed=1)
    seen = {}

    class Checked(GradientAligned):
        def begin_block(self, ctx):
            super().begin_block(ctx)
            if ctx.block.name in seen or getattr(ctx, "phase", None) != "weights":
                return
            w = torch.softmax(torch.randn(len(calib), generator=torch.Generator().manual_seed(2)), 0)
            idx, groups = torch.arange(8), timestep_groups(ctx.val_step, 2)
            a, b = (meta_gradient(ctx, ctx.params, w, idx, groups, 1e-2, mode="reverse",
                                  calib_steps=ctx.calib_step, val_steps=ctx.val_step,
                                  jacobian=j).grad_w for j in ("linearise", "materialise"))
            seen[ctx.block.name] = float((a - b).norm() / a.norm())

    gw = Checked(meta_steps=2, groups=2, meta_batch_size=8, val_batch_size="all")
    gw.prepare(calib, val, _ctx(tmp_path))
    BRECQ(**{**FAST, "iters_w": 4, "iters_a": 4}).reconstruct(unet, q, adapter, calib, val, gw,
                                                             _ctx(tmp_path))
    blocks = gw.state()["blocks"]
    assert set(blocks) == set(FEW[2:4]) == set(seen)
    assert all(b["jacobian"] == "materialise" for b in blocks.values())
    assert all(d < 1e-4 for d in seen.values()), seen
