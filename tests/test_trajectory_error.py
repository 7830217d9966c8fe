"""Per-step error between FP and quantized trajectories of the paired seeds (the record's
``trajectory_error``, plotted by the HTML report)."""
import pytest
import torch

from ptqbench.pipeline.trajectory_error import trajectory_error
from ptqbench.quant import QuantRecipe, quantize_model
from ptqbench.sampling import DDIMSampler, SamplerSpec
from ptqbench_plugins.models.diffusers_unet import DiffusersUNet

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny():
    adapter = DiffusersUNet(path="builtin:tiny-mnist")
    fp = adapter.load(CPU)
    qmodel, _ = quantize_model(fp, QuantRecipe.from_options(bits="W4A32"), adapter)
    return adapter, fp, qmodel


def test_same_model_has_no_error(tiny):
    adapter, fp, _ = tiny
    spec = SamplerSpec(steps=4, spacing="quad")
    err = trajectory_error(adapter, fp, fp, spec, seed=0, num_samples=3, device=CPU)
    assert err["x_mse"] == [0.0] * 5 and err["out_mse"] == [0.0] * 4
    assert err["num_samples"] == 3 and len(err["timesteps"]) == 4


def test_quantized_drift_matches_the_samples_it_pairs_with(tiny):
    adapter, fp, q = tiny
    spec = SamplerSpec(steps=5, spacing="quad")
    err = trajectory_error(adapter, fp, q, spec, seed=3, num_samples=4, device=CPU)
    assert len(err["x_mse"]) == 6 and len(err["out_mse"]) == 5 and len(err["x_mse_ci"]) == 6
    assert err["x_mse"][0] == 0.0  # both start from the same x_T
    assert all(v > 0 for v in err["x_mse"][1:]) and all(v > 0 for v in err["out_mse"])
    assert all(lo <= v <= hi for v, (lo, hi) in zip(err["out_mse"], err["out_mse_ci"]))
    # the last entry is the error of the final outputs: sample both models independently
    sampler = DDIMSampler(spec, adapter.scheduler_config)
    with torch.inference_mode():
        a = sampler.run(lambda x, t, k: adapter.denoise(fp, x, t), adapter.sample_shape,
                        range(4), 3, CPU)
        b = sampler.run(lambda x, t, k: adapter.denoise(q, x, t), adapter.sample_shape,
                        range(4), 3, CPU)
    assert err["x_mse"][-1] == pytest.approx(float((a.double() - b.double()).pow(2).mean()),
                                             rel=1e-6)
