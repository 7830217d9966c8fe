"""Latent diffusion families on tiny random instances: unconditional LDM (VQ / LDM-4 layout and
KL / LDM-8 church layout) and the class-conditional cin256-v2 layout."""
import pytest
import torch

from family_suites import family_suite, run_suite
from ptqbench.calib.trajectories import get_trajectories
from ptqbench.families_testing import build_ldm, build_ldm_cin
from ptqbench.quant import (QuantRecipe, calibrate_activation_ranges, load_quantized,
                            quantize_model, save_quantized)
from ptqbench.sampling import SamplerSpec, ddim_timesteps
from ptqbench_plugins.models.ldm import LatentDiffusion
from ptqbench_plugins.models.ldm_cin import ClassConditionalLDM

CPU = torch.device("cpu")
LEADING = 'kind = "ddim"\nsteps = 4\nspacing = "leading"\neta = 1.0'


@pytest.fixture(scope="module")
def cin(tmp_path_factory):
    return build_ldm_cin(tmp_path_factory.mktemp("cin"))[0]


def test_ldm_ddim_grid_and_final_alpha():
    # LDM's DDIM: range(0, T, T // S) + 1, and the last step lands on alphas_cumprod[0]
    assert ddim_timesteps(4, 1000, "leading").tolist() == [751, 501, 251, 1]
    from ptqbench.families_testing import LDM_SCHEDULER
    from ptqbench.samplers import make_sampler

    s = make_sampler(SamplerSpec(steps=4, spacing="leading"), LDM_SCHEDULER)
    assert s.alpha(-1) == pytest.approx(float(s.alphas_cumprod[0]))
    assert s.alpha(-1) < 1.0


@pytest.mark.parametrize("ae", ["vq", "kl"])
def test_unconditional_ldm_blocks_decode_and_scale(tmp_path, ae):
    folder, _, _ = build_ldm(tmp_path / ae, ae)
    a = LatentDiffusion(path=str(folder))
    m = a.load(CPU)
    names = [b.name for b in a.blocks(m)]
    assert names[:2] == ["time_embedding", "conv_in"] and names[-1] == "conv_out"
    assert "mid_block.attentions.0" in names and "down_blocks.0.downsamplers.0" in names
    assert a.latent_scale == (1.0 if ae == "vq" else 0.5)  # from the autoencoder's config
    z = torch.randn(2, *a.sample_shape)
    vae = a.autoencoder(CPU)
    expected = ((vae.decode(z / a.latent_scale).sample.clamp(-1, 1) + 1) * 127.5).round()
    assert torch.equal(a.decode(z), expected.to(torch.uint8))
    assert a.decode(z).shape == (2, 3, 16, 16)
    assert a.conditioning(torch.arange(2), 0) is None and a.denoiser_passes(None) == [None]


def test_unconditional_ldm_end_to_end(tmp_path):
    folder, _, _ = build_ldm(tmp_path / "kl", "kl")
    recs = run_suite(family_suite(tmp_path, folder, "ldm", {}, sampler=LEADING),
                     tmp_path / "out")
    assert all(r["status"] == "ok" for r in recs.values()), [r["error"] for r in recs.values()]
    assert recs[("rtn", "W8A8")]["metrics"]["paired_mse"]["value"] > 0
    assert recs[("qdiffusion", "W8A8")]["metrics"]["paired_mse"]["value"] > 0


def test_cin_blocks_guidance_and_calibration_passes(cin, tmp_path):
    a = ClassConditionalLDM(path=str(cin), guidance_scale=3.0)
    m = a.load(CPU)
    names = [b.name for b in a.blocks(m)]
    assert "unet.down_blocks.1.attentions.0.transformer_blocks.0" in names
    assert "unet.down_blocks.1.attentions.0.proj_in" in names and names[-1] == "unet.conv_out"
    assert a.null_class == 5 and a.num_classes == 5
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([501, 1]), torch.tensor([0, 3])
    c, u = a.denoise(m, x, t, y), a.denoise(m, x, t, torch.tensor([5, 5]))
    torch.testing.assert_close(a.guided_denoise(m, x, t, y), u + 3.0 * (c - u),
                               atol=1e-5, rtol=1e-4)
    # the class token is the embedding row of the label (the original ClassEmbedder)
    ctx = m.class_embedder(y)[:, None]
    torch.testing.assert_close(m.unet(x, t, encoder_hidden_states=ctx).sample, c)
    traj = get_trajectories(a, m, SamplerSpec(steps=2, spacing="leading"), num_samples=4,
                            seed=0, cache_dir=tmp_path, device=CPU, batch_size=2)
    assert traj.cond[1::2].tolist() == [5, 5] and (traj.cond[0::2] < 5).all()


def test_cin_save_load_and_split(cin, tmp_path):
    a = ClassConditionalLDM(path=str(cin))
    m = a.load(CPU)
    traj = get_trajectories(a, m, SamplerSpec(steps=2, spacing="leading"), num_samples=4,
                            seed=0, cache_dir=tmp_path, device=CPU, batch_size=4)
    calib = traj.gather(torch.tensor([0, 1, 0, 1]), torch.arange(4))
    recipe = QuantRecipe.from_options("W4A8", split_shortcut=True)
    q, manifest = quantize_model(m, recipe, a)
    assert manifest["counts"]["split_layers"] > 0  # the shortcut split reaches inside the wrapper
    assert any(e["name"] == "class_embedder" for e in manifest["full_precision_modules"])
    calibrate_activation_ranges(q, a, calib, 4, CPU)
    save_quantized(q, tmp_path / "q.pt")
    loaded = load_quantized(a.load(CPU), recipe, a, tmp_path / "q.pt")
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([251, 1]), torch.tensor([2, 4])
    torch.testing.assert_close(a.guided_denoise(loaded, x, t, y), a.guided_denoise(q, x, t, y),
                               rtol=0, atol=0)


def test_cin_end_to_end(cin, tmp_path):
    recs = run_suite(family_suite(tmp_path, cin, "ldm-cin", {"guidance_scale": 3.0},
                                  sampler=LEADING.replace("eta = 1.0", "eta = 0.0")),
                     tmp_path / "out")
    assert all(r["status"] == "ok" for r in recs.values()), [r["error"] for r in recs.values()]
    q = recs[("qdiffusion", "W8A8")]
    assert q["metrics"]["paired_mse"]["value"] > 0
    assert any("transformer_blocks" in b["name"] for b in q["reconstruction"]["blocks"])
