"""The ``paired`` metric: per-sample MSE / PSNR against the FP samples, with bootstrap intervals."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from ptqbench import MetricContext
from ptqbench.errors import PtqbenchError
from ptqbench.metrics.bootstrap import bootstrap_mean, t975
from ptqbench_plugins.metrics.paired import Paired, register_metrics


def _ctx(fp=None, reference=False) -> MetricContext:
    return MetricContext(fp_samples=fp, is_reference_cell=reference, cache_dir=Path("."),
                         device=torch.device("cpu"), seed=0)


def _pair():
    """Two 1x2x2 grayscale samples and their FP counterparts, differences chosen by hand."""
    fp = torch.tensor([[[[10, 20], [30, 40]]], [[[0, 0], [0, 0]]]], dtype=torch.uint8)
    q = fp.clone()
    q[0, 0, 0, 0] = 61  # sample 0: one pixel off by 51 = 0.2 in [0, 1] -> MSE 0.04 / 4 = 0.01
    q[1] = 255  # sample 1: every pixel off by 1.0 -> MSE 1
    return q, fp


def test_hand_computed_mse_and_psnr():
    q, fp = _pair()
    out = Paired(bootstrap=0).compute(q, _ctx(fp))
    mse, psnr = out["paired_mse"], out["paired_psnr"]
    assert mse["value"] == pytest.approx((0.01 + 1.0) / 2, rel=1e-12)
    assert psnr["value"] == pytest.approx((20.0 + 0.0) / 2, rel=1e-12)  # 10 log10(1/0.01) = 20
    assert mse["n"] == psnr["n"] == 2
    assert mse["higher_is_better"] is False and psnr["higher_is_better"] is True
    assert "ci" not in mse and psnr["identical"] == 0


def test_systematic_part_of_the_error_by_hand():
    q, fp = _pair()
    sys_ = Paired(bootstrap=0).compute(q, _ctx(fp))["paired_mse"]["systematic"]
    # errors e0 = (0.2, 0, 0, 0), e1 = (1, 1, 1, 1): mean image (0.6, 0.5, 0.5, 0.5)
    assert sys_["mse"] == pytest.approx((0.36 + 3 * 0.25) / 4, rel=1e-12)
    assert sys_["fraction"] == pytest.approx(0.2775 / 0.505, rel=1e-12)
    assert sys_["channel_shift"] == [pytest.approx(0.525, rel=1e-12)]


def test_a_common_shift_is_all_systematic_and_symmetric_noise_none():
    fp = torch.full((4, 3, 2, 2), 100, dtype=torch.uint8)
    shifted = fp.clone()
    shifted[:, 0] += 10  # a red cast on every sample
    out = Paired(bootstrap=0).compute(shifted, _ctx(fp))["paired_mse"]["systematic"]
    assert out["fraction"] == pytest.approx(1.0, rel=1e-12)
    assert out["channel_shift"] == [pytest.approx(10 / 255), 0.0, 0.0]
    noisy = fp.clone()
    noisy[0::2] += 10  # +10 on half of the samples, -10 on the other half
    noisy[1::2] -= 10
    out = Paired(bootstrap=0).compute(noisy, _ctx(fp))["paired_mse"]["systematic"]
    assert out["mse"] == 0.0 and out["fraction"] == 0.0


def test_error_tail_by_hand():
    # 200 samples: 198 one grey level off in one pixel of four, 2 entirely off by 1.0
    fp = torch.zeros((200, 1, 2, 2), dtype=torch.uint8)
    q = fp.clone()
    q[:, 0, 0, 0] = 1
    q[:2] = 255
    tail = Paired(bootstrap=0).compute(q, _ctx(fp))["paired_mse"]["tail"]
    small = (1 / 255) ** 2 / 4
    assert tail["p50"] == pytest.approx(small) and tail["p90"] == pytest.approx(small)
    assert tail["max"] == 1.0
    total = 2 * 1.0 + 198 * small
    assert tail["share_worst_1pct"] == pytest.approx(2.0 / total)  # 1% of 200 = the 2 bad ones
    assert tail["share_worst_10pct"] == pytest.approx((2.0 + 18 * small) / total)
    # the 99% quantile interpolates between the 2nd (1.0) and 3rd (small) largest of 200
    assert tail["p99"] == pytest.approx(small + 0.01 * (1.0 - small), rel=1e-9)
    even = Paired(bootstrap=0).compute(torch.full_like(fp, 1), _ctx(fp))["paired_mse"]["tail"]
    assert even["share_worst_1pct"] == pytest.approx(0.01)
    assert even["share_worst_10pct"] == pytest.approx(0.10)


def test_frequency_split_by_hand():
    # FP: a smooth ramp; a constant offset is all coarse, a checkerboard all fine-scale
    fp = torch.arange(16, dtype=torch.uint8).reshape(1, 1, 4, 4).repeat(2, 1, 1, 1) * 4 + 20
    shifted = fp + 10
    out = Paired(bootstrap=0).compute(shifted, _ctx(fp))["paired_mse"]["detail"]
    assert out["hf_fraction"] == pytest.approx(0.0, abs=1e-12)
    assert out["hf_energy_ratio"] == pytest.approx(1.0)  # same detail, shifted
    checker = (torch.arange(4).view(4, 1) + torch.arange(4).view(1, 4)) % 2 * 2 - 1  # +-1
    noisy = (fp.int() + 8 * checker).to(torch.uint8)
    out = Paired(bootstrap=0).compute(noisy, _ctx(fp))["paired_mse"]["detail"]
    # by hand: the error e = +-8/255 has 3x3 local means of 0 (interior, 9 cells: 5 vs 4 signs
    # -> +-1/9), so its high-pass part keeps most of the energy; compute it exactly here
    e = 8 * checker.double() / 255
    blur = torch.nn.functional.avg_pool2d(e.view(1, 1, 4, 4), 3, 1, 1, count_include_pad=False)
    expected = float(((e - blur[0, 0]) ** 2).sum() / (e ** 2).sum())
    assert out["hf_fraction"] == pytest.approx(expected) and expected > 0.8
    assert out["hf_energy_ratio"] > 2  # the ramp had little fine detail (its borders); now a lot
    flat = torch.full((2, 1, 4, 4), 7, dtype=torch.uint8)
    out = Paired(bootstrap=0).compute(flat + 1, _ctx(flat))["paired_mse"]["detail"]
    assert out["hf_energy_ratio"] is None and out["hf_fraction"] == pytest.approx(0.0, abs=1e-12)


def test_identical_sample_gets_the_largest_finite_uint8_psnr():
    q, fp = _pair()
    q[1] = fp[1]
    out = Paired(bootstrap=0).compute(q, _ctx(fp))
    cap = 10 * math.log10(255.0 ** 2 * 4)  # one grey level in one of 4 values
    assert out["paired_psnr"]["value"] == pytest.approx((20.0 + cap) / 2)
    assert out["paired_psnr"]["identical"] == 1
    assert out["paired_mse"]["value"] == pytest.approx(0.005)


def test_bootstrap_interval_is_fixed_seed_and_brackets_the_mean():
    g = torch.Generator().manual_seed(0)
    fp = torch.randint(0, 256, (64, 3, 8, 8), generator=g, dtype=torch.uint8)
    noise = torch.randint(-20, 21, fp.shape, generator=g)
    q = (fp.int() + noise).clamp(0, 255).to(torch.uint8)
    a = Paired(bootstrap=500, seed=1).compute(q, _ctx(fp))
    b = Paired(bootstrap=500, seed=1).compute(q, _ctx(fp))
    assert a == b
    for key in ("paired_mse", "paired_psnr"):
        lo, hi = a[key]["ci"]
        assert lo < a[key]["value"] < hi
    # chunking does not change the values
    c = Paired(bootstrap=500, seed=1, chunk=7).compute(q, _ctx(fp))
    assert c["paired_mse"]["value"] == pytest.approx(a["paired_mse"]["value"], rel=1e-12)
    expected = ((q.double() - fp.double()) / 255).square().flatten(1).mean(1).mean()
    assert a["paired_mse"]["value"] == pytest.approx(float(expected), rel=1e-12)


def test_reference_cell_and_missing_fp_samples():
    q, fp = _pair()
    ref = Paired().compute(fp, _ctx(fp, reference=True))
    assert ref["paired_mse"]["value"] == 0.0
    assert ref["paired_psnr"]["value"] is None and "reference cell" in ref["paired_psnr"]["unavailable"]
    missing = Paired().compute(q, _ctx(None))
    assert missing["paired_mse"]["value"] is None and missing["paired_mse"]["unavailable"]


def test_shape_mismatch_and_bad_options_raise():
    q, fp = _pair()
    with pytest.raises(PtqbenchError, match="shape"):
        Paired().compute(q[:1], _ctx(fp))
    with pytest.raises(PtqbenchError, match="unknown option"):
        Paired(resamples=10)
    with pytest.raises(PtqbenchError, match="bootstrap"):
        Paired(bootstrap=-1)
    assert Paired.needs_fp_samples
    registered = []
    register_metrics(register=registered.append)
    assert [c.name for c in registered] == ["paired"]


def test_bootstrap_mean_and_t_quantiles():
    v = torch.arange(100, dtype=torch.float64)
    mean, ci = bootstrap_mean(v, resamples=2000, seed=0)
    assert mean == 49.5
    # the standard error of the mean of 0..99 is about 2.9: the interval is about +-5.7
    assert 4.5 < (ci[1] - ci[0]) / 2 < 7.0
    assert bootstrap_mean(v, resamples=0)[1] is None
    assert t975(9) == pytest.approx(2.262) and t975(1000) == pytest.approx(1.962, abs=2e-3)
