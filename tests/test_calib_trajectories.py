"""The FP trajectory store: pairing of x_t with t, caching, content hashing, atomicity."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ptqbench.calib import trajectories as T
from ptqbench.calib.testing import write_tiny_unet
from ptqbench.errors import PtqbenchError
from ptqbench.sampling import DDIMSampler, SamplerSpec, draw, sample_generators

from ptqbench_plugins.models.diffusers_unet import DiffusersUNet

SPEC = SamplerSpec(steps=10, spacing="quad")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = write_tiny_unet(tmp_path_factory.mktemp("tiny_unet"))
    adapter = DiffusersUNet(path=str(folder))
    model = adapter.load(torch.device("cpu"))
    return adapter, model


def record(tiny, cache, n=5, seed=3, batch=2, **kw):
    adapter, model = tiny
    return T.get_trajectories(adapter, model, SPEC, n, seed, cache, "cpu", batch, **kw)


def test_each_x_t_is_paired_with_its_own_timestep(tiny, tmp_path):
    adapter, model = tiny
    traj = record(tiny, tmp_path)
    sampler = DDIMSampler(SPEC, adapter.scheduler_config)
    assert traj.x.shape == (10, 5, *adapter.sample_shape)
    assert torch.equal(traj.t, sampler.timesteps)
    # Step 0 is x_T of calibration sample indices 10**9 + i (never an evaluation x_T).
    x_T = draw(sample_generators(3, range(T.CALIB_INDEX_OFFSET, T.CALIB_INDEX_OFFSET + 5)),
               adapter.sample_shape)
    torch.testing.assert_close(traj.x[0], x_T)
    # x[k+1] must be one DDIM step from (x[k], t[k]); with t[k+1] or t[k-1] it is not.
    with torch.no_grad():
        for k in range(traj.num_steps - 1):
            x_k = traj.x[k].clone()
            right = sampler.step(adapter.denoise(model, x_k, traj.t[k].repeat(5)).double(), k,
                                 x_k.double(), None).float()
            torch.testing.assert_close(right, traj.x[k + 1], rtol=1e-4, atol=1e-5)
            right_err = (right - traj.x[k + 1]).abs().max()
            for j in (k - 1, k + 1):  # the neighbours' timesteps: the classic off-by-one
                if 0 <= j < traj.num_steps:
                    wrong = sampler.step(adapter.denoise(model, x_k, traj.t[j].repeat(5)).double(),
                                         k, x_k.double(), None).float()
                    assert (wrong - traj.x[k + 1]).abs().max() > 20 * right_err + 1e-6
    # gather keeps the pairing for arbitrary (step, sample) pairs
    cs = traj.gather(torch.tensor([7, 2, 7]), torch.tensor([1, 4, 0]))
    assert cs.t.tolist() == [int(traj.t[7]), int(traj.t[2]), int(traj.t[7])]
    torch.testing.assert_close(cs.x[1], traj.x[2, 4])


def stores(cache: Path) -> list[Path]:
    return sorted(p for p in (cache / "trajectories").glob("*/n*") if T.is_complete(p))


def test_cache_hit_reuses_store_and_miss_records(tiny, tmp_path, monkeypatch):
    first = record(tiny, tmp_path)
    assert len(stores(tmp_path)) == 1
    # A hit must not sample: make recording fail and load again.
    monkeypatch.setattr(T, "record_trajectories",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("re-recorded")))
    again = record(tiny, tmp_path)
    torch.testing.assert_close(first.x, again.x)
    # Batch size is not part of the key (per-sample seeds make it irrelevant).
    record(tiny, tmp_path, batch=5)
    # Fewer samples of the same recording: the prefix of the existing store, no sampling.
    fewer = record(tiny, tmp_path, n=3)
    assert fewer.num_samples == 3 and torch.equal(fewer.x, first.x[:, :3])
    monkeypatch.undo()
    # More samples, another seed or features: a miss -> a new store.
    more = record(tiny, tmp_path, n=6)
    torch.testing.assert_close(more.x[:, :5], first.x, rtol=1e-4, atol=1e-4)
    record(tiny, tmp_path, seed=4)
    record(tiny, tmp_path, with_features=True)
    assert len(stores(tmp_path)) == 4
    # now n=4 resolves to the smallest store that holds it (n5), not n6
    assert T.find_store(tmp_path, T.trajectory_key(tiny[0], SPEC, 4, 3)).name == "n5"


def test_batch_size_does_not_change_contents(tiny, tmp_path):
    a = record(tiny, tmp_path / "a", batch=2)
    b = record(tiny, tmp_path / "b", batch=5)
    torch.testing.assert_close(a.x, b.x, rtol=1e-4, atol=1e-4)


def test_manifest_content_hashes_and_verification(tiny, tmp_path):
    record(tiny, tmp_path)
    (store,) = stores(tmp_path)
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["format"] == T.FORMAT
    assert store.name == "n5"
    assert store.parent.name == T.key_hash(T.family_key(manifest["key"]))[:32]
    assert manifest["key"]["index_offset"] == T.CALIB_INDEX_OFFSET
    assert set(manifest["files"]) == {"x.npy", "t.npy"}
    for name, f in manifest["files"].items():
        assert f["sha256"] == T.file_sha256(store / name)
    T.verify_store(store)
    # Flip one value in place (same size): only the content hash can notice.
    arr = np.load(store / "x.npy", mmap_mode="r+")
    arr[3, 1, 0, 0, 0] += 1.0
    arr.flush()
    del arr
    assert T.is_complete(store)
    with pytest.raises(PtqbenchError, match="corrupt"):
        T.verify_store(store)


def test_killed_recording_leaves_no_complete_store(tiny, tmp_path, monkeypatch):
    adapter, model = tiny
    calls = {"n": 0}
    real = adapter.denoise

    def dying(m, x, t, cond=None):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt  # what a kill looks like from inside Python
        return real(m, x, t, cond)

    monkeypatch.setattr(adapter, "denoise", dying)
    with pytest.raises(KeyboardInterrupt):
        record(tiny, tmp_path)
    root = tmp_path / "trajectories"
    assert not [p for p in root.rglob("*") if p.is_dir() and p.name.startswith(("n", ".partial"))]
    # A partial folder left by a hard kill is never taken for a store either.
    key = T.trajectory_key(adapter, SPEC, 5, 3)
    fake = T.store_dir(tmp_path, key)
    fake.mkdir(parents=True)
    np.save(fake / "x.npy", np.zeros(3, dtype=np.float32))
    assert not T.is_complete(fake)
    monkeypatch.undo()
    traj = record(tiny, tmp_path)  # replaces the broken folder
    assert T.is_complete(fake) and traj.num_samples == 5


def test_features_are_recorded_per_step_for_a_subset(tiny, tmp_path):
    adapter, model = tiny
    traj = record(tiny, tmp_path, with_features=True, feature_samples=3)
    assert traj.features is not None
    assert traj.features.shape[:2] == (10, 3)
    # The stored map is the mid-block output for (x[k], t[k]) of the first samples.
    captured = {}
    h = adapter.feature_site(model).register_forward_hook(lambda m, i, o: captured.setdefault("o", o))
    with torch.no_grad():
        adapter.denoise(model, traj.x[4, :3].clone(), traj.t[4].repeat(3))
    h.remove()
    torch.testing.assert_close(traj.features[4], captured["o"], rtol=1e-4, atol=1e-5)
    plain = record(tiny, tmp_path)
    assert plain.features is None


def test_bad_arguments(tiny, tmp_path):
    with pytest.raises(PtqbenchError):
        record(tiny, tmp_path, n=0)
    with pytest.raises(PtqbenchError):
        record(tiny, tmp_path, batch=0)


def test_over_the_host_budget_steps_go_straight_to_the_file(tiny, tmp_path):
    adapter, model = tiny
    buffered, direct = tmp_path / "buffered", tmp_path / "direct"
    for out, budget in ((buffered, None), (direct, 1)):
        out.mkdir()
        T.record_trajectories(adapter, model, SPEC, 4, 3, out, "cpu", 2, host_budget=budget)
    a, b = np.load(buffered / "x.npy"), np.load(direct / "x.npy")
    assert a.shape == b.shape and np.array_equal(a, b)
