"""Fast sampling path (folded weights, table activation quantizers) and real int8 execution."""
import pytest
import torch
from torch import nn

from ptqbench.errors import PtqbenchError
from ptqbench.quant import QuantRecipe, calibrate_activation_ranges, quantize_model
from ptqbench.quant.context import sampler_step
from ptqbench.quant.fast import (Execution, FastDenoiser, FoldedLayer, make_denoiser,
                                 prepare_for_sampling)
from ptqbench.quant.int8 import Int8Layer, int8_support
from ptqbench.quant.model import fold_weights
from ptqbench.quant.modules import QuantLayer
from ptqbench.quant.testing import UNetAdapter, random_calib

STEPS = 4


def _quantized(model, adapter, bits="W4A8", per_step=True, **options):
    opts = dict(split_shortcut=True, weight_init="minmax", act_init="minmax", **options)
    if per_step:
        opts.update(act_params="per_step", sampler_steps=STEPS)
    recipe = QuantRecipe.from_options(bits, **opts)
    q, _ = quantize_model(model, recipe, adapter)
    calib = random_calib(24, shape=adapter.sample_shape, num_steps=STEPS)
    calibrate_activation_ranges(q, adapter, calib, 12, "cpu")
    fold_weights(q)
    return q


@pytest.fixture(scope="module")
def tiny():
    from ptqbench_plugins.models.diffusers_unet import DiffusersUNet

    adapter = DiffusersUNet("builtin:tiny-mnist")
    model = adapter.load(torch.device("cpu"))
    return adapter, model


def _reference(adapter, q, x, t, k):
    with torch.inference_mode(), sampler_step(k):
        return adapter.denoise(q, x, t)


def test_fast_step_equals_reference_on_tiny_model(tiny):
    adapter, model = tiny
    q = _quantized(model, adapter)
    x = torch.randn((6,) + tuple(adapter.sample_shape), generator=torch.Generator().manual_seed(1))
    t = torch.full((6,), 400)
    denoise, info = make_denoiser(adapter, q, Execution.from_options("fast"), "cpu", True)
    assert info["execution"]["mode"] == "fast" and info["execution"]["compile"] is False
    assert info["manifest"]["per_step_tables"] is True
    outs = []
    for k in range(STEPS):
        with torch.inference_mode():
            out = denoise(x, t, k)
        ref = _reference(adapter, q, x, t, k)
        # same ops on the same dequantized weights: equal within fp32 rounding (bitwise on CPU)
        assert (out - ref).abs().max().item() <= 1e-6
        outs.append(out)
    # the step index really selects the per-step activation parameters
    assert (outs[0] - outs[3]).abs().max().item() > 1e-4
    # the reference model is untouched: still QuantLayers, still usable
    assert any(isinstance(m, QuantLayer) for m in q.modules())
    prepared = prepare_for_sampling(q, Execution.from_options("fast").resolved("cpu"))
    assert not any(isinstance(m, QuantLayer) for m in prepared.model.modules())
    assert prepared.manifest["folded_layers"] == sum(isinstance(m, QuantLayer)
                                                     for m in q.modules())


def test_fast_step_equals_reference_on_cifar10_ddpm_s_layout():
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    # cifar10-ddpm-s: google/ddpm-cifar10-32's layout at half width (random weights)
    model = UNet2DModel(sample_size=32, in_channels=3, out_channels=3,
                        block_out_channels=(64, 128, 128, 128), layers_per_block=2,
                        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D",
                                          "DownBlock2D"),
                        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                        attention_head_dim=None).eval().requires_grad_(False)
    adapter = UNetAdapter(model)
    q = _quantized(model, adapter, bits="W8A8", per_step=False)
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([900, 900])
    fd = FastDenoiser(prepare_for_sampling(q, Execution.from_options("fast").resolved("cpu")),
                      adapter.denoise)
    with torch.inference_mode():
        out = fd(x, t, 0)
    assert (out - _reference(adapter, q, x, t, 0)).abs().max().item() <= 1e-6


def test_compiled_fast_path_does_not_recompile_per_step():
    # a small stack of per-step layers: tracing the whole UNet takes too long for a unit test
    torch.manual_seed(0)
    layers = [QuantLayer(nn.Conv2d(4, 8, 3, padding=1), 4, 8, act_steps=STEPS),
              QuantLayer(nn.Conv2d(8, 4, 1), 4, 8, act_steps=STEPS)]
    for layer in layers:
        layer.weight_quantizers[0].init_range("minmax")
        for k in range(STEPS):  # a different activation range per step
            layer.act_quantizers[0].set_range(torch.tensor([0.02 * (k + 1)]),
                                              torch.tensor([100.0]), step=k)
    ref_model = nn.Sequential(layers[0], nn.SiLU(), layers[1])
    ref_model._ptqbench_quant = {"fp_layers": {}}
    frames = []

    def counting_backend(gm, example_inputs):
        frames.append(gm)
        return gm.forward

    prepared = prepare_for_sampling(ref_model, Execution.from_options("fast").resolved("cpu"))
    fd = FastDenoiser(prepared, lambda m, x, t, c: m(x))
    torch._dynamo.reset()
    fd.fn = torch.compile(fd.fn, backend=counting_backend, dynamic=False)
    x, t = torch.randn(3, 4, 5, 5), torch.zeros(3)
    outs = []
    for k in range(STEPS):
        with torch.inference_mode():
            outs.append(fd(x, t, k))
        with torch.inference_mode(), sampler_step(k):
            ref = ref_model(x)
        assert (outs[-1] - ref).abs().max().item() <= 1e-6
        if k == 0:
            n_graphs = len(frames)
    assert n_graphs >= 1 and len(frames) == n_graphs  # a step change is a write, not a recompile
    assert (outs[0] - outs[-1]).abs().max().item() > 1e-3
    torch._dynamo.reset()


def test_bf16_fast_path_is_close_and_records_its_numerics(tiny):
    adapter, model = tiny
    q = _quantized(model, adapter, per_step=False)
    ex = Execution.from_options("fast", {"dtype": "bf16", "compile": False})
    denoise, info = make_denoiser(adapter, q, ex, "cpu", True)
    x, t = torch.randn((4,) + tuple(adapter.sample_shape)), torch.full((4,), 600)
    with torch.inference_mode():
        out = denoise(x, t, 0)
    assert out.dtype == torch.float32
    ref = _reference(adapter, q, x, t, 0)
    assert (out - ref).abs().max().item() < 0.2 * ref.abs().max().item()
    assert info["execution"]["dtype"] == "bf16"
    assert ex.identity(quantized=True) == {"dtype": "bf16"}
    assert Execution.from_options("fast").identity(quantized=True) is None
    assert Execution.from_options("int8").identity(quantized=False) is None


def test_execution_options_are_validated():
    with pytest.raises(PtqbenchError, match="execution must be one of"):
        Execution.from_options("turbo")
    with pytest.raises(PtqbenchError, match="unknown execution option"):
        Execution.from_options("fast", {"graphs": True})
    with pytest.raises(PtqbenchError, match="dtype"):
        Execution.from_options("fast", {"dtype": "fp16"})
    assert Execution().resolved("cpu").cuda_graphs is False
    assert Execution.from_options("int8").resolved("cpu", quantized=False).mode == "fast"
    assert Execution.from_options("reference").resolved("cuda").compile is False


def test_deterministic_mode_does_not_compile_unless_asked():
    """Inductor may choose kernels by timing them (not covered by torch's deterministic flag):
    under deterministic mode 'auto' keeps CUDA graphs but does not compile."""
    before = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(False)
        free = Execution().resolved("cuda")
        assert free.compile is True and free.cuda_graphs is True
        torch.use_deterministic_algorithms(True)
        det = Execution().resolved("cuda")
        assert det.compile is False and det.cuda_graphs is True and det.mode == "fast"
        assert Execution.from_options("fast", {"compile": True}).resolved("cuda").compile is True
    finally:
        torch.use_deterministic_algorithms(before)


# --------------------------------------------------------------------------------------------
# int8
# --------------------------------------------------------------------------------------------
def _exact(layer: QuantLayer, x: torch.Tensor) -> torch.Tensor:
    """The quantized layer in float64: dequantized input and weight, exact products."""
    xq = layer.quantize_input(x).double()
    w = layer.quantized_weight().double()
    b = None if layer.bias is None else layer.bias.double()
    if layer.kind == "conv2d":
        return nn.functional.conv2d(xq, w, b, **layer.conv_kwargs)
    return nn.functional.linear(xq, w, b)


@pytest.mark.parametrize("case", ["conv3x3s2", "conv1x1split", "linear", "conv_in"])
@pytest.mark.parametrize("wbits,act_sym", [(8, False), (4, False), (8, True)])
def test_int8_layer_equals_quantized_layer_exactly(case, wbits, act_sym):
    torch.manual_seed(0)
    split = 0
    if case == "conv3x3s2":
        fp, x = nn.Conv2d(16, 24, 3, stride=2, padding=1), torch.randn(5, 16, 9, 9) + 0.3
    elif case == "conv1x1split":
        fp, x, split = nn.Conv2d(24, 16, 1), torch.randn(5, 24, 4, 4), 8
        x[:, 8:] *= 3.0  # the two halves get different ranges
    elif case == "conv_in":
        fp, x = nn.Conv2d(3, 8, 3, padding=1), torch.randn(4, 3, 6, 6)  # K = 27: padded GEMM
    else:
        fp, x = nn.Linear(20, 12), torch.randn(3, 7, 20)
    layer = QuantLayer(fp, wbits, 8, act_mode="symmetric" if act_sym else "asymmetric",
                       split=split)
    for wq in layer.weight_quantizers:
        wq.init_range("minmax")
    for i, aq in enumerate(layer.act_quantizers):
        part = x if not split else (x[:, :split] if i == 0 else x[:, split:])
        lo, hi = part.min(), part.max() * 0.8  # some clipping
        from ptqbench.quant.quantizer import scale_zero_point
        aq.set_range(*scale_zero_point(lo.reshape(1), hi.reshape(1), 8, aq.mode))
    assert int8_support(layer) is None
    int8 = Int8Layer(layer, None)
    with torch.no_grad():
        exact = _exact(layer, x)
        out = int8(x)
        sim = FoldedLayer(layer, None)(x)
    assert out.shape == exact.shape
    # int32 accumulation is exact: only the final fp32 scaling rounds
    assert (out.double() - exact).abs().max().item() <= 1e-5 * exact.abs().max().item()
    assert (sim.double() - exact).abs().max().item() <= 1e-4 * exact.abs().max().item()


def test_int8_execution_lists_simulated_layers(tiny):
    adapter, model = tiny
    q = _quantized(model, adapter, bits="W4A8", per_step=True, first_last_bits="fp")
    prepared = prepare_for_sampling(q, Execution.from_options("int8").resolved("cpu"))
    man = prepared.manifest
    simulated = {e["name"]: e["reason"] for e in man["simulated_layers"]}
    assert "conv_in" not in man["int8_layers"] and "full precision" in simulated["conv_in"]
    assert any("attention matmuls" in r for r in simulated.values())
    assert len(man["int8_layers"]) > 10
    x, t = torch.randn((4,) + tuple(adapter.sample_shape)), torch.full((4,), 300)
    fd = FastDenoiser(prepared, adapter.denoise)
    for k in (0, STEPS - 1):
        with torch.inference_mode():
            out = fd(x, t, k)
        ref = _reference(adapter, q, x, t, k)
        # exact integer arithmetic vs fp32 accumulation: equal up to rare rounding flips
        mse = ((out - ref) ** 2).mean().item()
        assert mse < 1e-4 * (ref ** 2).mean().item()
    no_convs = prepare_for_sampling(q, Execution.from_options(
        "int8", {"int8_convs": False}).resolved("cpu")).manifest
    assert any("int8_convs = false" in e["reason"] for e in no_convs["simulated_layers"])


def test_int8_check_reports_paired_error_against_the_simulated_model(tiny):
    from ptqbench.quant.fast import int8_check
    from ptqbench.sampling import DDIMSampler, SamplerSpec

    adapter, model = tiny
    q = _quantized(model, adapter, bits="W8A8", per_step=False)
    spec = SamplerSpec(steps=10)
    res = int8_check(adapter, q, spec, 0, 4, "cpu",
                     Execution.from_options("int8", {"int8_check_samples": 4}))
    assert res["samples"] == 4 and res["paired_mse_vs_simulated"] > 0
    # Layers agree to fp32 rounding (tests above), but a quantized network is discontinuous:
    # rare rounding flips compound along the trajectory. Still well under the quantization
    # error itself (simulated vs FP samples of the same seeds).
    sampler = DDIMSampler(spec, adapter.scheduler_config)
    sim, _ = make_denoiser(adapter, q, Execution.from_options("fast"), "cpu", True)
    with torch.inference_mode():
        a = sampler.run(sim, adapter.sample_shape, range(4), 0, torch.device("cpu"))
        b = sampler.run(lambda x, t, k: adapter.denoise(model, x, t), adapter.sample_shape,
                        range(4), 0, torch.device("cpu"))
    assert res["paired_mse_vs_simulated"] < 0.5 * ((a - b) ** 2).mean().item()
    assert int8_check(adapter, q, spec, 0, 2, "cpu",
                      Execution.from_options("int8", {"int8_check_samples": 0})) == {"samples": 0}


def test_int8_layer_traces_under_compile_without_recompiles_per_step():
    torch.manual_seed(0)
    layer = QuantLayer(nn.Conv2d(8, 16, 3, padding=1), 4, 8, act_steps=STEPS)
    layer.weight_quantizers[0].init_range("minmax")
    for k in range(STEPS):
        layer.act_quantizers[0].set_range(torch.tensor([0.01 * (k + 1)]), torch.tensor([128.0]),
                                          step=k)
    step = torch.zeros(1, dtype=torch.long)
    int8 = Int8Layer(layer, step)
    frames = []

    def backend(gm, example_inputs):
        frames.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(int8, backend=backend, dynamic=False)
    x = torch.randn(2, 8, 6, 6)
    for k in range(STEPS):
        step.fill_(k)
        with torch.no_grad(), sampler_step(k):
            assert torch.equal(compiled(x), int8(x))
            exact = _exact(layer, x)
        assert (int8(x).double() - exact).abs().max().item() <= 1e-5 * exact.abs().max().item()
    assert len(frames) == 1
    torch._dynamo.reset()
