"""Quantizer math against hand-computed values and gradients."""
import pytest
import torch

from ptqbench.quant.context import sampler_step
from ptqbench.quant.lsq import ActQuantizer
from ptqbench.quant.quantizer import (fake_quant, init_range, qrange, quantize_codes,
                                      scale_zero_point)
from ptqbench.quant.weight import WeightQuantizer


def test_asymmetric_4bit_minmax_hand_computed():
    x = torch.tensor([-1.0, -0.35, 0.2, 0.55, 2.0])
    s, z = init_range(x[None], 4, "asymmetric", "minmax")
    # range [-1, 2] over 15 steps: scale 0.2, zero point round(1 / 0.2) = 5
    assert s.item() == pytest.approx(0.2)
    assert z.item() == 5
    codes = quantize_codes(x, s, z, *qrange(4, "asymmetric"))
    assert codes.tolist() == [0, 3, 6, 8, 15]
    deq = fake_quant(x, s, z, *qrange(4, "asymmetric"))
    assert torch.allclose(deq, torch.tensor([-1.0, -0.4, 0.2, 0.6, 2.0]), atol=1e-6)


def test_symmetric_and_unsigned_grids():
    assert qrange(4, "symmetric") == (-8, 7)
    assert qrange(8, "unsigned") == (0, 255)
    x = torch.tensor([-1.4, 0.33, 0.75])
    s, z = init_range(x[None], 4, "symmetric", "minmax")
    assert s.item() == pytest.approx(0.2) and z.item() == 0  # absmax / (2^(b-1) - 1)
    assert quantize_codes(x, s, z, -8, 7).tolist() == [-7, 2, 4]
    s, z = scale_zero_point(torch.tensor([0.0]), torch.tensor([0.51]), 8, "unsigned")
    assert s.item() == pytest.approx(0.002) and z.item() == 0


def test_range_always_contains_zero():
    s, z = scale_zero_point(torch.tensor([0.5]), torch.tensor([2.0]), 4, "asymmetric")
    assert z.item() == 0 and s.item() == pytest.approx(2.0 / 15)


def test_ste_gradient_is_identity_inside_and_zero_when_clipped():
    s, z = torch.tensor([0.1]), torch.tensor([8.0])
    x = torch.tensor([-2.0, -0.33, 0.02, 0.41, 3.0], requires_grad=True)
    fake_quant(x, s, z, 0, 15).sum().backward()
    # codes: -20+8 -> clipped low, inside, inside, inside, 30+8 -> clipped high
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]


def test_lsq_step_size_gradient_matches_hand_formula():
    q = ActQuantizer(4, "asymmetric")
    q.set_range(torch.tensor([0.1]), torch.tensor([8.0]))
    q.scale.requires_grad_(True)
    x = torch.tensor([-2.0, -0.33, 0.02, 0.41, 0.47, 3.0])
    q(x).sum().backward()
    s, z, qmin, qmax = 0.1, 8.0, 0, 15
    expected = 0.0
    for v in x.tolist():
        code = round(v / s) + z
        if code < qmin:
            expected += qmin - z
        elif code > qmax:
            expected += qmax - z
        else:
            expected += round(v / s) - v / s
    assert q.scale.grad.item() == pytest.approx(expected, abs=1e-5)


def test_lsq_gradient_scale_option():
    x = torch.randn(2, 10)
    grads = []
    for gs in (False, True):
        q = ActQuantizer(8, "asymmetric")
        q.set_range(torch.tensor([0.02]), torch.tensor([128.0]))
        q.scale.requires_grad_(True)
        q.lsq_grad_scale = gs
        q(x).pow(2).sum().backward()
        grads.append(q.scale.grad.item())
    assert grads[1] == pytest.approx(grads[0] / (10 * 255) ** 0.5, rel=1e-5)


def _brute_force_mse(x2d, bits, mode, p=2.4, grid=80):
    scales, zps = [], []
    qmin, qmax = qrange(bits, mode)
    for row in x2d:  # the reference loops over channels and candidates
        best, best_sz = float("inf"), None
        lo, hi = row.min(), row.max()
        for i in range(grid):
            r = 1.0 - 0.01 * i
            s, z = scale_zero_point((lo * r).reshape(1), (hi * r).reshape(1), bits, mode)
            xq = (quantize_codes(row, s, z, qmin, qmax) - z) * s
            err = (row - xq).abs().pow(p).mean().item()
            if err < best:
                best, best_sz = err, (s.item(), z.item())
        scales.append(best_sz[0])
        zps.append(best_sz[1])
    return torch.tensor(scales), torch.tensor(zps)


@pytest.mark.parametrize("mode", ["asymmetric", "symmetric"])
def test_vectorised_per_channel_mse_search_equals_brute_force(mode):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 40, generator=g) * torch.linspace(0.1, 3, 6)[:, None]
    w[2, 5] = 9.0  # an outlier channel: the search must clip it
    s, z = init_range(w, 4, mode, "mse")
    rs, rz = _brute_force_mse(w, 4, mode)
    assert torch.allclose(s, rs, rtol=1e-6)
    assert torch.equal(z, rz)
    mm, _ = init_range(w, 4, mode, "minmax")
    assert s[2] < mm[2]  # the outlier is clipped


def test_percentile_init():
    x = torch.arange(1000, dtype=torch.float32)[None]  # 0..999
    s, z = init_range(x, 8, "asymmetric", "percentile", percentile=0.99)
    # nearest rank: the 990th smallest value is 989; low percentile 10 is above 0 -> range [0, 989]
    assert s.item() == pytest.approx(989 / 255)
    assert z.item() == 0


def test_weight_quantizer_per_channel_and_per_tensor():
    w = torch.tensor([[1.0, -1.0], [4.0, -4.0]])
    pc = WeightQuantizer(w, 4, "symmetric", per_channel=True)
    pc.init_range("minmax")
    assert pc.scale.flatten().tolist() == pytest.approx([1 / 7, 4 / 7])
    pt = WeightQuantizer(w, 4, "symmetric", per_channel=False)
    pt.init_range("minmax")
    assert pt.scale.shape == (1, 1) and pt.scale.item() == pytest.approx(4 / 7)
    assert torch.allclose(pc(), w)


def test_per_timestep_activation_parameters_index_by_step():
    q = ActQuantizer(8, "asymmetric", num_steps=3)
    for k, s in enumerate([0.1, 0.2, 0.4]):
        q.set_range(torch.tensor(s), torch.tensor(128.0), step=k)
    x = torch.full((2, 3), 0.33)
    ref = {s: fake_quant(x, torch.tensor(s), torch.tensor(128.0), 0, 255) for s in (0.1, 0.2, 0.4)}
    assert torch.equal(q(x), ref[0.1])  # outside any context: step 0
    with sampler_step(1):
        assert torch.equal(q(x), ref[0.2])
    with sampler_step(torch.tensor([2, 0])):
        out = q(x)
    assert torch.equal(out[0], ref[0.4][0]) and torch.equal(out[1], ref[0.1][1])
    with pytest.raises(IndexError):
        with sampler_step(3):
            q(x)
