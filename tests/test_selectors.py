"""Step selectors: counts, (x_t, t) pairing, validation sets, TDAC scores and allocation."""
from __future__ import annotations

import pytest
import torch

from ptqbench.calib.tdac import allocate, tdac_scores
from ptqbench.errors import PtqbenchError
from ptqbench.interfaces import Trajectories
from ptqbench.registry import default_registry

from ptqbench_plugins.selectors.all_steps import AllSteps
from ptqbench_plugins.selectors.normal_steps import NormalSteps
from ptqbench_plugins.selectors.random_steps import RandomSteps
from ptqbench_plugins.selectors.tdac import TDAC
from ptqbench_plugins.selectors.uniform_steps import UniformSteps


def synthetic(num_steps: int, num_samples: int, features=None) -> Trajectories:
    """x[k, i] is filled with k * 100000 + i, t descends like a sampler's timesteps."""
    code = (torch.arange(num_steps)[:, None] * 100000 + torch.arange(num_samples)[None, :])
    x = code[:, :, None, None, None].float().expand(num_steps, num_samples, 1, 2, 2).clone()
    t = torch.linspace(999, 0, num_steps).round().long()
    return Trajectories(x=x, t=t, features=features)


def decode(cs):
    code = cs.x[:, 0, 0, 0].long()
    return code // 100000, code % 100000


def check_pairing(traj, cs):
    steps, samples = decode(cs)
    assert torch.equal(steps, cs.step)
    assert torch.equal(cs.t, traj.t[steps])
    return steps, samples


GEN = lambda: torch.Generator().manual_seed(0)  # noqa: E731


def test_uniform_steps_default_is_qdiffusion_20_by_256():
    sel = UniformSteps()
    assert sel.num_trajectories(100) == 256 + 13  # 5 % of 5120 over 20 steps = 12.8 -> 13
    traj = synthetic(100, sel.num_trajectories(100))
    calib, val = sel.select(traj, GEN(), None)
    assert len(calib) == 5120
    steps, samples = check_pairing(traj, calib)
    assert sorted(set(steps.tolist())) == list(range(0, 100, 5))  # Q-Diffusion's grid
    assert torch.bincount(steps, minlength=100)[::5].eq(256).all()
    assert set(samples.tolist()) == set(range(256))
    # validation: same grid, equal count per step, trajectories never used for calibration
    vsteps, vsamples = check_pairing(traj, val)
    assert torch.bincount(vsteps, minlength=100)[::5].eq(13).all() and len(val) == 260
    assert set(vsamples.tolist()) == set(range(256, 269))
    assert val.meta["role"] == "validation" and val.meta["per_step"] == 13


def test_uniform_steps_grid_when_steps_do_not_divide():
    sel = UniformSteps(steps=3, per_step=2, validation_fraction=0)
    calib, val = sel.select(synthetic(10, 2), GEN(), None)
    assert val is None
    assert sorted(set(calib.step.tolist())) == [0, 3, 6]


def test_validation_fraction_does_not_change_calibration():
    a, _ = UniformSteps(steps=4, per_step=8, validation_fraction=0).select(synthetic(20, 8), GEN(), None)
    b, v = UniformSteps(steps=4, per_step=8, validation_fraction=0.25).select(synthetic(20, 16), GEN(), None)
    assert torch.equal(a.x, b.x) and torch.equal(a.t, b.t)
    assert len(v) == 8 and torch.bincount(v.step).max() == 2


def test_normal_steps_follows_ptq4dm():
    sel = NormalSteps(num_samples=4000, validation_fraction=0.05)
    S = 50
    traj = synthetic(S, sel.num_trajectories(S))
    calib, val = sel.select(traj, GEN(), None)
    assert len(calib) == 4000
    steps, samples = check_pairing(traj, calib)
    assert torch.equal(samples, torch.arange(4000))  # one x_t per trajectory
    # t index from the clean end is int(N(0.4, 0.4) * S) clamped: check the distribution
    t_index = (S - 1) - steps
    u = torch.randn(4000, generator=GEN(), dtype=torch.float64) * 0.4 + 0.4
    assert torch.equal(t_index, (u * S).long().clamp(0, S - 1))
    frac_clamped_low = (t_index == 0).float().mean()
    assert 0.15 < frac_clamped_low < 0.25  # P(u < 1/S) ~ 0.19 (truncation toward zero)
    # validation covers every step equally: 5 % of 4000 over 50 steps = 4 per step
    vsteps, vsamples = check_pairing(traj, val)
    assert torch.bincount(vsteps, minlength=S).eq(4).all()
    assert vsamples.min() >= 4000


def test_random_and_all_steps_counts():
    traj = synthetic(10, 64 + 8)
    calib, val = RandomSteps(num_samples=64).select(traj, GEN(), None)
    steps, samples = check_pairing(traj, calib)
    assert len(calib) == 64 and torch.equal(samples, torch.arange(64))
    assert len(set(steps.tolist())) > 5
    assert torch.bincount(val.step, minlength=10).eq(1).all()
    sel = AllSteps(per_step=6)
    traj = synthetic(10, sel.num_trajectories(10))
    calib, val = sel.select(traj, GEN(), None)
    steps, samples = check_pairing(traj, calib)
    assert torch.bincount(steps, minlength=10).eq(6).all() and len(calib) == 60
    assert set(samples.tolist()) == set(range(6))
    assert torch.bincount(val.step, minlength=10).eq(1).all()


def test_too_few_trajectories_is_an_error():
    with pytest.raises(PtqbenchError, match="needs 269 trajectories"):
        UniformSteps().select(synthetic(100, 256), GEN(), None)


@pytest.mark.parametrize("cls,opts,bad", [
    (UniformSteps, {"steps": 0}, "steps"),
    (UniformSteps, {"per_step": 2.5}, "per_step"),
    (UniformSteps, {"validation_fraction": 1.0}, "validation_fraction"),
    (NormalSteps, {"std": 0}, "std"),
    (NormalSteps, {"mean": 1.5}, "mean"),
    (RandomSteps, {"num_samples": -1}, "num_samples"),
    (AllSteps, {"per_step": True}, "per_step"),
    (TDAC, {"radius": -1.0}, "radius"),
    (TDAC, {"lam": "x"}, "lam"),
    (TDAC, {"feature_site": 3}, "feature_site"),
])
def test_bad_options_name_the_option(cls, opts, bad):
    with pytest.raises(PtqbenchError, match=bad):
        cls(**opts)


def test_uniform_steps_more_steps_than_sampler():
    with pytest.raises(PtqbenchError, match="distinct steps"):
        UniformSteps(steps=20, per_step=1).select(synthetic(10, 5), GEN(), None)


# ---------------------------------------------------------------------------------------------
# TDAC
# ---------------------------------------------------------------------------------------------
def known_features():
    """4 steps, 2 samples, 2 channels, 1 position; see test_tdac_known_density_and_diversity."""
    per_step = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    return per_step[:, None, :, None].expand(4, 2, 2, 1).clone()


def test_tdac_known_density_and_diversity():
    # pairwise MSE: 0-1: 0, 0-2: 1, 0-3: 2, 1-2: 1, 1-3: 2, 2-3: 1; cosines 1, 0, -1, 0, -1, 0
    s = tdac_scores(known_features(), radius=1.0, lam=1.0)
    assert s["density"].tolist() == [2, 2, 3, 1]
    assert s["diversity"].tolist() == [6, 6, 6, 10]  # sum_j K * (1 - cos), K = 2
    assert s["density_norm"].tolist() == [0.5, 0.5, 1.0, 0.0]
    assert s["diversity_norm"].tolist() == [0.0, 0.0, 0.0, 1.0]
    assert s["score"].tolist() == [0.5, 0.5, 1.0, 1.0]
    assert allocate(s["score"], 30).tolist() == [5, 5, 10, 10]
    s2 = tdac_scores(known_features(), radius=1.0, lam=0.5)
    assert s2["score"].tolist() == [0.5, 0.5, 1.0, 0.5]


def reference_tdac(features, radius, lam):
    """A literal loop version of EDA-DM's calibration code (per pair of steps)."""
    S = features.shape[0]
    dense = torch.zeros(S)
    cos = torch.zeros(S)
    cs = torch.nn.CosineSimilarity(dim=1, eps=1e-6)
    for i in range(S):
        for j in range(S):
            if i != j:
                if torch.mean((features[i] - features[j]) ** 2) <= radius:
                    dense[i] += 1
                cos[i] += torch.sum(1 - cs(features[i], features[j]))
    dn = (dense - dense.min()) / (dense.max() - dense.min())
    cn = (cos - cos.min()) / (cos.max() - cos.min())
    return dense, cos, dn + lam * cn


def test_tdac_matches_reference_loops_on_random_maps():
    g = torch.Generator().manual_seed(3)
    f = torch.randn(12, 3, 5, 2, 2, generator=g) * torch.linspace(0.5, 2, 12)[:, None, None, None, None]
    f = f.double()
    radius = float(torch.quantile(torch.stack([((f[i] - f[j]) ** 2).mean() for i in range(12)
                                               for j in range(12) if i != j]), 0.4))
    dense, cos, score = reference_tdac(f, radius, 1.2)
    s = tdac_scores(f, radius, 1.2)
    assert s["density"].tolist() == dense.tolist()
    torch.testing.assert_close(s["diversity"].double(), cos.double(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(s["score"].double(), score.double(), rtol=1e-5, atol=1e-5)


def test_allocate_fixes_rounding_like_eda_dm():
    assert allocate(torch.tensor([1.0, 1.0, 1.0]), 10).tolist() == [4, 3, 3]
    assert allocate(torch.tensor([0.25, 0.25, 0.25, 0.25]), 2).tolist() == [1, 1, 0, 0]
    assert allocate(torch.tensor([0.0, 0.0]), 5).sum() == 5  # no preference -> uniform
    # 3.33, 2.22, 2.22, 2.22 -> 3, 2, 2, 2; the missing one goes to the step with the most
    assert allocate(torch.tensor([3.0, 2.0, 2.0, 2.0]), 10).tolist() == [4, 2, 2, 2]
    # 1.5 each rounds (half to even) to 2: two too many, taken from the last steps
    assert allocate(torch.tensor([1.0, 1.0, 1.0, 1.0]), 6).tolist() == [2, 2, 1, 1]


def test_tdac_selector_allocates_by_score():
    feats = known_features()
    sel = TDAC(num_samples=30, radius=1.0, lam=1.0, validation_fraction=0.1)
    assert sel.needs_features and sel.trajectory_options(4)["with_features"]
    traj = synthetic(4, sel.num_trajectories(4), features=feats)
    calib, val = sel.select(traj, GEN(), None)
    steps, samples = check_pairing(traj, calib)
    assert torch.bincount(steps, minlength=4).tolist() == [5, 5, 10, 10]
    assert torch.equal(samples, torch.arange(30))
    assert calib.meta["step_scores"].tolist() == [0.5, 0.5, 1.0, 1.0]
    assert torch.bincount(val.step, minlength=4).eq(1).all()  # 3 samples / 4 steps -> 1 each
    with pytest.raises(PtqbenchError, match="with_features"):
        sel.select(synthetic(4, sel.num_trajectories(4)), GEN(), None)


def test_selectors_are_registered():
    names = default_registry(include_external=False).names("selectors")
    assert {"uniform-steps", "normal-steps", "tdac", "random", "all-steps"} <= set(names)
