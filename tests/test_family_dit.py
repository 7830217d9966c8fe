"""The DiT family on a tiny random instance: blocks, labels, guidance as the original DiT,
conditional calibration data (both guidance passes), the samplers, save/load, end to end; and
the trained DiT stand-in from the shared data folder on a tiny budget."""
import numpy as np
import pytest
import torch

from family_suites import family_suite, run_suite
from ptqbench.calib.trajectories import get_trajectories, read_manifest
from ptqbench.families_testing import build_dit
from ptqbench.quant import (QuantRecipe, calibrate_activation_ranges, load_quantized,
                            quantize_model, save_quantized)
from ptqbench.sampling import SamplerSpec
from ptqbench_plugins.models.dit import DiT

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny_dit(tmp_path_factory):
    folder, plugin, options = build_dit(tmp_path_factory.mktemp("dit"))
    return folder


def test_blocks_labels_and_guidance(tiny_dit):
    a = DiT(path=str(tiny_dit), guidance_scale=2.0)
    m = a.load(CPU)
    assert [b.name for b in a.blocks(m)] == ["pos_embed", "transformer_blocks.0",
                                             "transformer_blocks.1", "proj_out_1", "proj_out_2"]
    assert a.null_class == 5 and a.sample_shape == (3, 8, 8)
    labels = a.conditioning(torch.arange(40), seed=3)
    assert torch.equal(labels, a.conditioning(torch.arange(40), seed=3))  # pure in (seed, index)
    assert labels.min() >= 0 and labels.max() < 5 and len(set(labels.tolist())) > 1
    assert torch.equal(a.conditioning(torch.arange(3, 6), 3), labels[3:6])  # batch-independent
    assert a.denoiser_passes(labels[:2])[1].tolist() == [5, 5]

    x, t = torch.randn(2, 3, 8, 8), torch.tensor([900, 10])
    y = torch.tensor([1, 4])
    cond = a.denoise(m, x, t, y)
    uncond = a.denoise(m, x, t, torch.tensor([5, 5]))
    guided = a.guided_denoise(m, x, t, y)
    # the original DiT guides the first 3 channels: here all of them, u + s (c - u)
    torch.testing.assert_close(guided, uncond + 2.0 * (cond - uncond), atol=1e-5, rtol=1e-4)


def test_guidance_channels_and_learned_variance(tmp_path):
    folder, _, _ = build_dit(tmp_path / "lv", learned_variance=True, latent=True)
    a = DiT(path=str(folder), guidance_scale=4.0)
    assert a.learned_variance and a.guidance_channels == 3 and a.sample_shape == (4, 8, 8)
    assert a.scheduler_config["variance_type"] == "learned_range"
    m = a.load(CPU)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([500, 500]), torch.tensor([0, 2])
    c, u = a.denoise(m, x, t, y), a.denoise(m, x, t, a.null_conditioning(y))
    g = a.guided_denoise(m, x, t, y)
    assert g.shape == (2, 8, 8, 8)
    torch.testing.assert_close(g[:, :3], u[:, :3] + 4.0 * (c[:, :3] - u[:, :3]),
                               atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(g[:, 3:], c[:, 3:])  # 4th latent channel and variance: cond pass
    for spec in (SamplerSpec(kind="ddpm", steps=3, spacing="linspace"), SamplerSpec(steps=3)):
        x0 = a.sample(m, spec, [0, 1], 0, CPU)
        assert x0.shape == (2, 4, 8, 8) and torch.isfinite(x0).all()
        again = a.sample(m, spec, [1], 0, CPU)  # sample 1 alone: same result
        torch.testing.assert_close(again[0], x0[1], atol=1e-5, rtol=1e-4)
    img = a.decode(x0)
    assert img.dtype == torch.uint8 and img.shape == (2, 3, 16, 16)


def test_calibration_data_holds_both_guidance_passes(tiny_dit, tmp_path):
    a = DiT(path=str(tiny_dit))
    m = a.load(CPU)
    spec = SamplerSpec(steps=3)
    traj = get_trajectories(a, m, spec, num_samples=5, seed=0, cache_dir=tmp_path, device=CPU,
                            batch_size=2)
    assert traj.num_samples == 5 and traj.cond.shape == (5,)
    labels = a.conditioning(torch.arange(10 ** 9, 10 ** 9 + 3), 0)
    # entry j = pass j % 2 of trajectory j // 2: (label, null), (label, null), (label)
    assert traj.cond.tolist() == [labels[0], 5, labels[1], 5, labels[2]]
    assert torch.equal(traj.x[:, 0], traj.x[:, 1]) and torch.equal(traj.x[:, 2], traj.x[:, 3])
    assert not torch.equal(traj.x[:, 0], traj.x[:, 2])
    calib = traj.gather(torch.tensor([1, 1]), torch.tensor([0, 1]))
    assert calib.cond.tolist() == [labels[0], 5]
    # a smaller request reuses the store; its entries are the first ones
    small = get_trajectories(a, m, spec, num_samples=3, seed=0, cache_dir=tmp_path, device=CPU,
                             batch_size=3)
    assert torch.equal(small.x, traj.x[:, :3]) and torch.equal(small.cond, traj.cond[:3])
    key_dir = next(p for p in (tmp_path / "trajectories").rglob("manifest.json")).parent
    assert read_manifest(key_dir)["passes"] == 2
    # EDA-DM's features: one row per trajectory (its conditional pass), none left empty
    feat = get_trajectories(a, m, spec, num_samples=5, seed=0, cache_dir=tmp_path / "f",
                            device=CPU, batch_size=2, with_features=True).features
    assert feat.shape[:2] == (3, 3) and bool((feat.flatten(2).abs().sum(-1) > 0).all())


def test_quantized_dit_save_load_and_adaln_option(tiny_dit, tmp_path):
    a = DiT(path=str(tiny_dit))
    m = a.load(CPU)
    traj = get_trajectories(a, m, SamplerSpec(steps=2), num_samples=4, seed=0,
                            cache_dir=tmp_path, device=CPU, batch_size=4)
    calib = traj.gather(torch.tensor([0, 0, 1, 1]), torch.arange(4))
    recipe = QuantRecipe.from_options("W4A8", quantize_adaln=False)
    q, manifest = quantize_model(m, recipe, a)
    calibrate_activation_ranges(q, a, calib, 4, CPU)
    fp_reasons = {e["name"]: e["reason"] for e in manifest["full_precision_modules"]}
    assert "adaLN" in fp_reasons["transformer_blocks.0.norm1.linear"]
    assert "adaLN" in fp_reasons["proj_out_1"]
    assert manifest["roles"]["adaln"] == {"quantized": 0, "fp": 3}
    assert manifest["counts"]["quantized_matmuls"] == 2 * 2  # q@k^T and softmax@v per block
    names = {e["name"] for e in manifest["quantized_layers"]}
    assert {"transformer_blocks.1.attn1.to_q", "transformer_blocks.1.ff.net.0.proj",
            "transformer_blocks.0.norm1.emb.timestep_embedder.linear_1"} <= names
    qall, mall = quantize_model(m, QuantRecipe.from_options("W4A8"), a)
    assert mall["roles"]["adaln"] == {"quantized": 3, "fp": 0}

    save_quantized(q, tmp_path / "q.pt")
    loaded = load_quantized(a.load(CPU), recipe, a, tmp_path / "q.pt")
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([700, 20]), torch.tensor([1, 5])
    out = a.guided_denoise(q, x, t, y)
    torch.testing.assert_close(a.guided_denoise(loaded, x, t, y), out, rtol=0, atol=0)
    assert not torch.allclose(out, a.guided_denoise(m, x, t, y))


def test_dit_end_to_end_fp_rtn_qdiffusion(tiny_dit, tmp_path):
    suite = family_suite(tmp_path, tiny_dit, "dit", {"guidance_scale": 1.5})
    recs = run_suite(suite, tmp_path / "out")
    assert set(recs) == {("fp", "FP"), ("rtn", "W8A8"), ("qdiffusion", "W8A8")}
    assert all(r["status"] == "ok" for r in recs.values()), [r["error"] for r in recs.values()]
    for method in ("rtn", "qdiffusion"):
        assert recs[(method, "W8A8")]["metrics"]["paired_mse"]["value"] > 0
    blocks = [b["name"] for b in recs[("qdiffusion", "W8A8")]["reconstruction"]["blocks"]]
    assert "transformer_blocks.1" in blocks and blocks[-1] == "proj_out_2"


@pytest.mark.slow  # the real 10.7M-parameter model on the CPU
def test_trained_dit_stand_in_rtn_and_reconstruction(shared_data, tmp_path):
    folder = shared_data / "models" / "cifar10-dit-s"
    if not (folder / "transformer" / "config.json").is_file():
        pytest.skip(f"{folder} is absent")
    # min-max ranges: the MSE range search over 10.7M weights dominates a CPU run
    suite = family_suite(tmp_path, folder, "dit", {"guidance_scale": 1.5},
                         sampler='kind = "ddim"\nsteps = 2\nspacing = "uniform"', num_samples=2,
                         recipe='{ weight_init = "minmax", act_init = "minmax" }')
    recs = run_suite(suite, tmp_path / "out")
    assert all(r["status"] == "ok" for r in recs.values()), [r["error"] for r in recs.values()]
    rtn = recs[("rtn", "W8A8")]
    assert rtn["coverage"]["counts"]["quantized_matmuls"] == 16  # 8 blocks x 2 matmuls
    assert np.isfinite(recs[("qdiffusion", "W8A8")]["metrics"]["paired_mse"]["value"])


def test_fast_sampling_path_of_a_quantized_conditional_model_equals_the_reference(tmp_path):
    """Guided sampling on the fast path (folded weights, table activation quantizers; both
    guidance passes in one call) gives the reference loop's samples, with per-step activation
    parameters, learned variance and the stochastic DDPM sampler; so do the trajectory-error
    pass and the reference denoiser, which now share the adapter's loop."""
    from ptqbench.pipeline.trajectory_error import trajectory_error
    from ptqbench.quant.fast import Execution, make_denoiser
    from ptqbench.quant.model import fold_weights
    from ptqbench.quant.testing import random_calib

    folder, _, _ = build_dit(tmp_path / "lv", learned_variance=True)
    a = DiT(path=str(folder), guidance_scale=4.0)
    fp = a.load(CPU)
    spec = SamplerSpec(kind="ddpm", steps=3, spacing="linspace")
    recipe = QuantRecipe.from_options("W4A8", weight_init="minmax", act_init="minmax",
                                      act_params="per_step", sampler_steps=3)
    q, _ = quantize_model(fp, recipe, a)
    calib = random_calib(12, shape=a.sample_shape, num_steps=3)
    calib.cond = torch.arange(12) % 6  # labels 0..4 and the null class 5
    calibrate_activation_ranges(q, a, calib, 6, "cpu")
    fold_weights(q)
    with torch.inference_mode():
        ref = a.sample(q, spec, [0, 1, 2], 7, CPU)
        out = {}
        for mode in ("reference", "fast"):
            denoise, info = make_denoiser(a, q, Execution.from_options(mode), CPU, True)
            assert info["manifest"]["mode"] == mode
            out[mode] = a.run_sampler(denoise, spec, [0, 1, 2], 7, CPU)
    assert torch.equal(out["reference"], ref)
    assert (out["fast"] - ref).abs().max().item() <= 1e-5
    assert not torch.equal(ref, a.sample(fp, spec, [0, 1, 2], 7, CPU))  # quantization shows
    err = trajectory_error(a, fp, q, spec, seed=7, num_samples=2, device=CPU)
    assert "unavailable" not in err and len(err["x_mse"]) == 4 and err["x_mse"][-1] > 0
