"""DDIM sampling: per-sample seeds, agreement with diffusers, timestep spacings."""
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from ptqbench.errors import PtqbenchError
from ptqbench.sampling import DDIMSampler, SamplerSpec, ddim_timesteps

CONFIG = dict(DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4,
                            beta_end=0.02, clip_sample=False).config)


def toy_denoiser(x, t, k):
    # deterministic, depends on x, t and the sample itself (so batch mixing would show)
    return 0.5 * torch.tanh(x) + 1e-3 * t.float().view(-1, 1, 1, 1)


@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_sample_i_is_independent_of_batching(eta):
    sampler = DDIMSampler(SamplerSpec(steps=8, eta=eta), CONFIG)
    shape, dev = (1, 4, 4), torch.device("cpu")
    whole = sampler.run(toy_denoiser, shape, range(0, 6), seed=3, device=dev)
    parts = torch.cat([sampler.run(toy_denoiser, shape, range(i, min(i + 4, 6)), seed=3, device=dev)
                       for i in range(0, 6, 4)])
    # one sample alone, as a different device/shard would run it
    alone = sampler.run(toy_denoiser, shape, [5], seed=3, device=dev)
    torch.testing.assert_close(whole, parts, rtol=0, atol=1e-6)
    torch.testing.assert_close(whole[5:], alone, rtol=0, atol=1e-6)
    other_seed = sampler.run(toy_denoiser, shape, [5], seed=4, device=dev)
    assert not torch.allclose(alone, other_seed)


def test_uniform_ddim_matches_diffusers():
    steps = 10
    ours = DDIMSampler(SamplerSpec(steps=steps, spacing="uniform"), CONFIG)
    ref = DDIMScheduler.from_config(CONFIG, timestep_spacing="leading", steps_offset=0,
                                    set_alpha_to_one=True, clip_sample=False)
    ref.set_timesteps(steps)
    assert ours.timesteps.tolist() == ref.timesteps.tolist()
    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    y_ours, y_ref = x.clone(), x.clone()
    for k, t in enumerate(ours.timesteps.tolist()):
        tv = torch.full((2,), t)
        y_ours = ours.step(toy_denoiser(y_ours, tv, k).double(), k, y_ours.double(), None).float()
        y_ref = ref.step(toy_denoiser(y_ref, tv, k), t, y_ref, eta=0.0).prev_sample
    torch.testing.assert_close(y_ours, y_ref, rtol=1e-4, atol=1e-5)


def test_quad_spacing_is_the_papers():
    seq = ddim_timesteps(100, 1000, "quad")
    expected = ((np.linspace(0, np.sqrt(800), 100)) ** 2).astype(int)[::-1]
    assert (seq == expected).all()  # repeats at the low end included, as in the papers' code
    assert seq[:3].tolist() == [800, 783, 768]  # (28.28 - k * 0.2857)^2, by hand
    assert seq[-8:].tolist() == [3, 2, 2, 1, 0, 0, 0, 0]
    assert ddim_timesteps(4, 1000, "uniform").tolist() == [750, 500, 250, 0]


def test_bad_sampler_specs():
    with pytest.raises(PtqbenchError, match="spacing"):
        SamplerSpec(spacing="cosine")
    with pytest.raises(PtqbenchError, match="eta"):
        SamplerSpec(eta=2.0)
