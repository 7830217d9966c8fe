"""quantize_model / calibration / manifest / attention processor / save-load on a tiny UNet."""
import json

import pytest
import torch
from torch import nn

from ptqbench.errors import PtqbenchError
from ptqbench.quant import (QuantRecipe, calibrate_activation_ranges, load_quantized,
                            quantize_model, sampler_step, save_quantized)
from ptqbench.quant.attention import QuantAttnProcessor
from ptqbench.quant.lsq import ActQuantizer
from ptqbench.quant.model import fold_weights, quant_layers
from ptqbench.quant.testing import UNetAdapter, random_calib, tiny_unet

FAST = dict(weight_init="minmax", act_init="minmax")


@pytest.fixture(scope="module")
def unet():
    return tiny_unet()


def _q(unet, bits="W4A8", **opts):
    return quantize_model(unet, QuantRecipe.from_options(bits=bits, **{**FAST, **opts}),
                          UNetAdapter(unet))


def test_recipe_rejects_unknown_and_bad_options():
    with pytest.raises(PtqbenchError, match="wieght_init"):
        QuantRecipe.from_options(bits="W4A8", wieght_init="mse")
    with pytest.raises(PtqbenchError, match="weight_init"):
        QuantRecipe.from_options(bits="W4A8", weight_init="median")
    with pytest.raises(PtqbenchError, match="sampler_steps"):
        QuantRecipe.from_options(bits="W4A8", act_params="per_step")
    with pytest.raises(PtqbenchError, match="first_last_bits"):
        QuantRecipe.from_options(bits="W4A8", first_last_bits=12)
    with pytest.raises(PtqbenchError):
        QuantRecipe.from_options(bits="W4A9x")
    r = QuantRecipe.from_options(bits="W4A8", first_last_bits="fp", act_params="per_step",
                                 sampler_steps=10)
    assert QuantRecipe.from_dict(r.to_dict()) == r


def test_quantize_model_is_a_copy_with_a_json_manifest(unet):
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    q, man = _q(unet)
    assert q is not unet
    assert all(torch.equal(v, unet.state_dict()[k]) for k, v in before.items())
    json.dumps(man)
    n_attn = sum(1 for m in unet.modules() if type(m).__name__ == "Attention")
    n_layers = sum(1 for m in unet.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    c = man["counts"]
    assert c["quantized_matmuls"] == 2 * n_attn and n_attn == 4
    assert c["quantized_layers"] == n_layers
    assert c["fp_attention_matmuls"] == 0
    fp_types = {e["type"] for e in man["full_precision_modules"]}
    assert "GroupNorm" in fp_types and "Conv2d" not in fp_types
    assert any("residual" in s for s in man["full_precision_ops"])
    mm = man["quantized_matmuls"][0]
    assert mm["name"].endswith(":q@k^T")
    sm = [m for m in man["quantized_matmuls"] if m["name"].endswith("softmax@v")][0]
    assert sm["inputs"]["softmax"]["mode"] == "unsigned" and sm["inputs"]["softmax"]["bits"] == 8


def test_first_and_last_layers(unet):
    q, man = _q(unet)
    for name in ("conv_in", "conv_out"):
        layer = q.get_submodule(name)
        assert layer.weight_quantizers[0].bits == 8 and layer.act_quantizers[0].bits == 8
    assert q.get_submodule("down_blocks.0.resnets.0.conv1").weight_quantizers[0].bits == 4
    q, man = _q(unet, first_last_bits="fp")
    assert isinstance(q.conv_in, nn.Conv2d) and isinstance(q.conv_out, nn.Conv2d)
    fp = {e["name"]: e["reason"] for e in man["full_precision_modules"]}
    assert "first layer" in fp["conv_in"] and "last layer" in fp["conv_out"]
    q, _ = _q(unet, first_last_bits=6)
    assert q.conv_in.weight_quantizers[0].bits == 6
    # "same": like every other layer (Q-Diffusion quantizes every conv/linear at W4A8 alike)
    q, man = _q(unet, first_last_bits="same")
    for name in ("conv_in", "conv_out"):
        layer = q.get_submodule(name)
        assert layer.weight_quantizers[0].bits == 4 and layer.act_quantizers[0].bits == 8
    entry = {e["name"]: e for e in man["quantized_layers"]}["conv_in"]
    assert entry["weight"]["bits"] == 4
    with pytest.raises(PtqbenchError, match="2..8, 'fp' or 'same'"):
        QuantRecipe.from_options(bits="W4A8", first_last_bits="model")


@pytest.mark.parametrize("bits", ["W32A32", "W16A16", "W16A32"])
def test_full_precision_bits_leave_modules_fp(unet, bits):
    q, man = _q(unet, bits=bits)
    assert not list(quant_layers(q))
    assert not any(isinstance(m, (ActQuantizer, QuantAttnProcessor)) for m in q.modules())
    assert man["counts"]["quantized_layers"] == 0
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([10, 500])
    with torch.no_grad():
        assert torch.equal(q(x, t).sample, unet(x, t).sample)


def test_weight_only_and_activation_only(unet):
    q, man = _q(unet, bits="W4A16")
    assert not any(isinstance(m, ActQuantizer) for m in q.modules())
    assert man["counts"]["quantized_matmuls"] == 0 and man["counts"]["fp_attention_matmuls"] == 8
    q, man = _q(unet, bits="W32A8")
    layer = q.get_submodule("down_blocks.0.resnets.0.conv1")
    assert layer.weight_quantizers is None and layer.act_quantizers is not None
    assert man["counts"]["weight_quantized_layers"] == 0


def test_shortcut_split_points_and_halves(unet):
    q, man = _q(unet, split_shortcut=True)
    # down path stack: conv_in 8, down0.res0 8, down0.ds 8, down1.res0 16 (popped from the end)
    expected = {"up_blocks.0.resnets.0.conv_shortcut": 16, "up_blocks.0.resnets.1.conv_shortcut": 16,
                "up_blocks.1.resnets.0.conv_shortcut": 16, "up_blocks.1.resnets.1.conv_shortcut": 8}
    got = {e["name"]: e["split"] for e in man["quantized_layers"] if e["split"]}
    assert got == expected
    layer = q.get_submodule("up_blocks.1.resnets.1.conv_shortcut")
    assert len(layer.act_quantizers) == 2 and len(layer.weight_quantizers) == 2
    w = unet.get_submodule("up_blocks.1.resnets.1.conv_shortcut").weight
    # each half's per-channel ranges come from that half of the weight only
    assert torch.allclose(layer.weight_quantizers[0].weight, w[:, :8])
    assert torch.allclose(layer.weight_quantizers[1].weight, w[:, 8:])
    x = torch.randn(2, 16, 4, 4)
    x[:, 8:] *= 50  # the skip half has a much wider range
    layer.act_quantizers[0].set_range(torch.tensor(0.01), torch.tensor(128.0))
    layer.act_quantizers[1].set_range(torch.tensor(0.5), torch.tensor(128.0))
    xq = layer.quantize_input(x)
    assert torch.equal(xq[:, :8], layer.act_quantizers[0](x[:, :8]))
    assert torch.equal(xq[:, 8:], layer.act_quantizers[1](x[:, 8:]))
    assert torch.equal(layer.quantized_weight(),
                       torch.cat([layer.weight_quantizers[0](), layer.weight_quantizers[1]()], 1))


def test_attention_processor_quantizes_both_matmuls(unet):
    q, _ = _q(unet)
    attn = q.mid_block.attentions[0]
    proc = attn.processor
    assert isinstance(proc, QuantAttnProcessor)
    calls = {}
    for name, aq in proc.quantizers().items():
        aq.register_forward_hook(lambda m, a, o, _n=name: calls.setdefault(_n, a[0]))
    h = torch.randn(2, 16, 2, 2)
    with torch.no_grad():
        attn(h)
    assert set(calls) == {"q", "k", "v", "softmax"}
    p = calls["softmax"]
    assert p.min() >= 0 and torch.allclose(p.sum(-1), torch.ones_like(p.sum(-1)), atol=1e-5)
    assert proc.p_quant.qmin == 0 and proc.p_quant.mode == "unsigned"
    # with its quantizers off the processor computes exactly diffusers' attention
    from diffusers.models.attention_processor import AttnProcessor2_0

    fp_attn = unet.mid_block.attentions[0]
    qfp, _ = _q(unet, bits="W32A8", first_last_bits="fp")
    a2 = qfp.mid_block.attentions[0]
    for m in a2.modules():
        if isinstance(m, ActQuantizer):
            m.enabled = False
    with torch.no_grad():
        ref = fp_attn(h)
        assert isinstance(fp_attn.processor, AttnProcessor2_0)
        assert torch.allclose(a2(h), ref, atol=1e-5)
        assert torch.allclose(a2(h, temb=torch.zeros(2, 32)), ref, atol=1e-5)


def test_calibration_per_step_params_and_exact_save_load(unet, tmp_path):
    adapter = UNetAdapter(unet)
    recipe = QuantRecipe.from_options(bits="W4A8", act_params="per_step", sampler_steps=5,
                                      split_shortcut=True, weight_init="mse", act_init="mse",
                                      act_calib_elements=4096)
    q, man = quantize_model(unet, recipe, adapter)
    assert man["quantized_layers"][0]["input"]["params"] == "per_step"
    calib = random_calib(16, num_steps=4)  # step 4 never appears: falls back to pooled
    info = calibrate_activation_ranges(q, adapter, calib, 8, "cpu")
    assert info["steps_without_data"] == [4]
    aq = q.get_submodule("down_blocks.0.resnets.0.conv1").act_quantizers[0]
    assert aq.scale.shape == (5,) and len(set(aq.scale[:4].tolist())) > 1
    x, t, step = calib.x[:6], calib.t[:6], calib.step[:6]
    with torch.no_grad(), sampler_step(step):
        out_rtn = q(x, t).sample
    path = tmp_path / "rtn.pt"
    save_quantized(q, path)
    q2 = load_quantized(unet, recipe, adapter, path)
    with torch.no_grad(), sampler_step(step):
        assert torch.equal(q2(x, t).sample, out_rtn)
    # AdaRound form (soft variables) and folded form both round-trip exactly
    layer = q.get_submodule("down_blocks.0.resnets.0.conv1")
    for wq in layer.weight_quantizers:
        wq.to_adaround()
    with torch.no_grad(), sampler_step(step):
        out_ada = q(x, t).sample
    save_quantized(q, path)
    q3 = load_quantized(unet, recipe, adapter, path)
    assert q3.get_submodule("down_blocks.0.resnets.0.conv1").weight_quantizers[0].form == "adaround"
    with torch.no_grad(), sampler_step(step):
        assert torch.equal(q3(x, t).sample, out_ada)
    fold_weights(q)
    with torch.no_grad(), sampler_step(step):
        out_folded = q(x, t).sample
    save_quantized(q, path)
    q4 = load_quantized(unet, recipe, adapter, path)
    with torch.no_grad(), sampler_step(step):
        assert torch.equal(q4(x, t).sample, out_folded)
    other = QuantRecipe.from_options(bits="W8A8")
    with pytest.raises(PtqbenchError, match="different recipe"):
        load_quantized(unet, other, adapter, path)


def test_inference_weight_cache(unet):
    q, _ = _q(unet)
    fold_weights(q)
    layer = q.get_submodule("conv_in")
    x, t = torch.randn(1, 3, 8, 8), torch.tensor([3])
    with torch.no_grad():
        q(x, t)
        cached = layer._wcache[1]
        q(x, t)
        assert layer._wcache[1] is cached  # computed once for sampling
        layer.weight_quantizers[0].scale.mul_(2)  # in-place change -> new version -> recompute
        q(x, t)
        assert layer._wcache[1] is not cached
