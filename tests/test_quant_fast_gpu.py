"""The fast sampling path compiled and replayed as CUDA graphs, and int8 kernels, on CUDA
(GPU only): one denoising step against the reference eager path."""
import pytest
import torch

from ptqbench.quant import QuantRecipe, calibrate_activation_ranges, quantize_model
from ptqbench.quant.context import sampler_step
from ptqbench.quant.fast import Execution, make_denoiser
from ptqbench.quant.model import fold_weights
from ptqbench.quant.testing import UNetAdapter, random_calib, tiny_unet

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _model(per_step: bool):
    dev = torch.device("cuda")
    unet = tiny_unet().to(dev)
    adapter = UNetAdapter(unet)
    opts = dict(weight_init="minmax", act_init="minmax", split_shortcut=True)
    if per_step:
        opts.update(act_params="per_step", sampler_steps=4)
    q, _ = quantize_model(unet, QuantRecipe.from_options("W8A8", **opts), adapter)
    calibrate_activation_ranges(q, adapter, random_calib(64), 32, dev)
    fold_weights(q)
    return adapter, q


@pytest.mark.parametrize("per_step", [False, True])
def test_compiled_graphed_step_matches_reference(per_step):
    adapter, q = _model(per_step)
    dev = torch.device("cuda")
    x = torch.randn(32, 3, 8, 8, device=dev)
    t = torch.full((32,), 500, device=dev)
    denoise, info = make_denoiser(adapter, q, Execution.from_options("fast"), dev, True)
    assert info["execution"]["compile"] and info["execution"]["cuda_graphs"]
    int8, _ = make_denoiser(adapter, q, Execution.from_options("int8"), dev, True)
    for k in range(4 if per_step else 1):
        with torch.inference_mode(), sampler_step(k):
            ref = adapter.denoise(q, x, t)
        with torch.inference_mode():
            fast = denoise(x, t, k)
            i8 = int8(x, t, k)
        scale = ref.abs().max().item()
        # fp32 rounding may flip a few codes; the bulk must agree to rounding
        assert (fast - ref).abs().median().item() <= 1e-5 * scale
        assert ((fast - ref) ** 2).mean().item() <= 1e-6 * scale ** 2
        assert ((i8 - ref) ** 2).mean().item() <= 1e-4 * scale ** 2


def test_guided_dit_samples_on_the_graphed_fast_path(tmp_path):
    """A quantized class-conditional DiT: both guidance passes inside one CUDA-graphed call
    (deterministic mode's fast path: graphs, no compile) give the reference loop's samples."""
    from ptqbench.families_testing import build_dit
    from ptqbench.sampling import SamplerSpec
    from ptqbench_plugins.models.dit import DiT

    dev = torch.device("cuda")
    folder, _, _ = build_dit(tmp_path / "dit", learned_variance=True)
    a = DiT(path=str(folder), guidance_scale=4.0)
    fp = a.load(dev)
    q, _ = quantize_model(fp, QuantRecipe.from_options(
        "W8A8", weight_init="minmax", act_init="minmax", act_params="per_step",
        sampler_steps=3), a)
    calib = random_calib(12, shape=a.sample_shape, num_steps=3)
    calib.cond = torch.arange(12) % 6
    calibrate_activation_ranges(q, a, calib, 6, dev)
    fold_weights(q)
    spec = SamplerSpec(kind="ddpm", steps=3, spacing="linspace")
    with torch.inference_mode():
        ref = a.sample(q, spec, range(8), 7, dev)
        denoise, info = make_denoiser(a, q, Execution.from_options("fast", {"compile": False}),
                                      dev, True)
        assert info["execution"]["cuda_graphs"] and not info["execution"]["compile"]
        fast = a.run_sampler(denoise, spec, range(8), 7, dev)
    scale = ref.abs().max().item()
    assert ((fast - ref) ** 2).mean().item() <= 1e-6 * scale ** 2
