"""AdaRound: rectified sigmoid, regulariser, beta schedule, hardening and folding."""
import pytest
import torch
from torch import nn

from ptqbench.quant import adaround as ar
from ptqbench.quant.modules import QuantLayer
from ptqbench.quant.weight import WeightQuantizer


def test_rectified_sigmoid_values():
    a = torch.tensor([0.0, 50.0, -50.0, 1.0])
    h = ar.rectified_sigmoid(a)
    assert h[0].item() == pytest.approx(0.5)  # sigmoid(0) * 1.2 - 0.1
    assert h[1].item() == 1.0 and h[2].item() == 0.0  # rectified: exactly 0/1 in the tails
    assert h[3].item() == pytest.approx(torch.sigmoid(torch.tensor(1.0)).item() * 1.2 - 0.1)


def test_init_alpha_inverts_rectified_sigmoid():
    rest = torch.tensor([0.1, 0.25, 0.5, 0.9])
    assert torch.allclose(ar.rectified_sigmoid(ar.init_alpha(rest)), rest, atol=1e-6)


def test_rounding_regulariser_hand_values():
    # h = 0.5 -> 1 - 0^beta = 1 ; h = 1 -> 0 ; h = 0 -> 0
    a = torch.tensor([0.0, 50.0, -50.0])
    assert ar.rounding_regularizer(a, 20.0).item() == pytest.approx(1.0)
    # h = 0.75 -> 1 - 0.5^2 = 0.75 with beta 2
    a75 = ar.init_alpha(torch.tensor([0.75]))
    assert ar.rounding_regularizer(a75, 2.0).item() == pytest.approx(0.75, abs=1e-5)
    # gradient flows to alpha
    a = torch.tensor([0.3], requires_grad=True)
    ar.rounding_regularizer(a, torch.tensor(2.0)).backward()
    assert a.grad.abs().item() > 0


def test_beta_schedule_warmup_and_linear_decay():
    s = ar.BetaSchedule(100, 20.0, 2.0, 0.2)
    assert s(0) == (20.0, False) and s(19) == (20.0, False)
    assert s(20) == (20.0, True)
    assert s(60)[0] == pytest.approx(11.0)
    assert s(100)[0] == pytest.approx(2.0)


def _wq(mode="asymmetric"):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 3, 3, 3, generator=g)
    q = WeightQuantizer(w, 4, mode, per_channel=True)
    q.init_range("minmax")
    return w, q


def test_adaround_starts_at_the_fp_weight_and_learns():
    # symmetric: no value reaches the clamp (asymmetric grids can clip by half a step there,
    # because the zero point is rounded), so AdaRound's soft start reproduces w everywhere
    w, q = _wq("symmetric")
    q.to_adaround()
    assert not hasattr(q, "weight")  # the FP copy is dropped: floor(w/s) + alpha hold it
    assert torch.allclose(q(), w, atol=1e-5)
    q.alpha.requires_grad_(True)
    q().sum().backward()
    assert q.alpha.grad is not None and q.alpha.grad.abs().sum() > 0


def test_hardening_and_folding():
    w, q = _wq()
    q.to_adaround()
    with torch.no_grad():
        q.alpha.add_(torch.randn_like(q.alpha))
    q.soft = False
    hard = q().clone()
    h = (q.alpha >= 0).float()
    expected = (torch.clamp(q.w_floor + h + q.zero_point, 0, 15) - q.zero_point) * q.scale
    assert torch.equal(hard, expected)
    q.fold()
    assert q.form == "folded"
    for gone in ("alpha", "w_floor", "weight"):
        assert not hasattr(q, gone)
    assert q.w_int.dtype == torch.uint8 and int(q.w_int.max()) <= 15
    assert torch.equal(q(), hard)
    assert set(q.state_dict()) == {"scale", "zero_point", "w_int"}


def test_rtn_fold_equals_round_to_nearest():
    w, q = _wq()
    rtn = q().clone()
    q.fold()
    assert torch.equal(q(), rtn)


def test_quant_layer_fold_keeps_outputs():
    conv = nn.Conv2d(6, 4, 3, padding=1)
    layer = QuantLayer(conv, 4, 8, split=2)
    for wq in layer.weight_quantizers:
        wq.init_range("minmax")
        wq.to_adaround()
        wq.soft = False
    x = torch.randn(2, 6, 5, 5)
    before = layer(x)
    for wq in layer.weight_quantizers:
        wq.fold()
    layer.clear_cache()
    assert torch.equal(layer(x), before)
    assert not any("alpha" in k or k.endswith(".weight") for k in layer.state_dict())
