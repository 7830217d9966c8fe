"""Inception metrics: agreement with torch-fidelity, sFID features, IS availability, caches.

The tests that run the network need the shared offline data (Inception weights, partial CIFAR-10)
at ../shared/data beside the project and are skipped without it. Inception-v3 on a CPU costs
0.1-0.4 s per image, so they use 16 + 16 images, featurized once per module (the plugins share
them through the cell's memo) plus once more inside torch-fidelity for the comparison.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ptqbench import MetricContext
from ptqbench.errors import PtqbenchError
from ptqbench.metrics import features as features_mod
from ptqbench.metrics.features import cache_key, cached_features, featurize
from ptqbench.metrics.fid import (Gaussian, bootstrap_fid, frechet_distance,
                                  frechet_distance_torch_fidelity, statistics, weighted_factor)
from ptqbench.metrics.inception import (HUB_FILENAME, WEIGHTS_ENV, get_featurizer,
                                        resolve_weights)
from ptqbench.metrics.reference import fingerprint, open_reference
from ptqbench_plugins.metrics import inception as plugin

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
WEIGHTS = DATA / "inception" / "weights-inception-2015-12-05-features-only.pth"
WEIGHTS_SHA256 = "d3982fe2960cdf1820e793fcc05e0ba1a10a9888ec28545f9e0a6e7b1b288b7d"
CIFAR = DATA / "cifar10-partial" / "train_x.npy"
needs_data = pytest.mark.skipif(
    not (WEIGHTS.is_file() and CIFAR.is_file()),
    reason=f"needs the shared offline data {WEIGHTS} and {CIFAR} (../shared/data beside the project)")
N = 16
KID_SUBSETS, KID_SUBSET_SIZE = 10, 8


# ---- fixtures ---------------------------------------------------------------------------------
class _Images(torch.utils.data.Dataset):
    """uint8 (3, H, W) tensors, the input torch-fidelity expects."""

    def __init__(self, x: torch.Tensor):
        self.x = x

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i]


@pytest.fixture(scope="module")
def cell(tmp_path_factory):
    """Two disjoint CIFAR sets: samples A (NCHW tensor) and reference B (an NHWC .npy file)."""
    root = tmp_path_factory.mktemp("cell")
    train = np.load(CIFAR, mmap_mode="r")
    a = torch.from_numpy(np.array(train[:N])).permute(0, 3, 1, 2).contiguous()
    b_nhwc = np.array(train[2500:2500 + N])
    np.save(root / "ref.npy", b_nhwc)
    b = torch.from_numpy(b_nhwc).permute(0, 3, 1, 2).contiguous()
    ctx = MetricContext(fp_samples=None, is_reference_cell=False, cache_dir=root / "cache",
                        device=torch.device("cpu"), seed=0, base_dir=root, shared={})
    return SimpleNamespace(a=a, b=b, ctx=ctx, root=root)


@pytest.fixture(scope="module")
def theirs(cell):
    """torch-fidelity's own FID/KID/PRC on the same two image sets."""
    import torch_fidelity

    return torch_fidelity.calculate_metrics(
        input1=_Images(cell.a), input2=_Images(cell.b), fid=True, kid=True, prc=True,
        feature_extractor="inception-v3-compat", feature_extractor_weights_path=str(WEIGHTS),
        cuda=False, verbose=False, cache=False, save_cpu_ram=True,
        kid_subsets=KID_SUBSETS, kid_subset_size=KID_SUBSET_SIZE)


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def _check_ci(v: dict) -> None:
    lo, hi = v["ci"]
    assert lo < v["value"] < hi


# ---- agreement with torch-fidelity -------------------------------------------------------------
@needs_data
def test_fid_equals_torch_fidelity(cell, theirs):
    out = plugin.FID(reference="ref.npy", weights=str(WEIGHTS), bootstrap=5).compute(cell.a, cell.ctx)
    fid = out["fid"]
    assert _rel(fid["value"], theirs["frechet_inception_distance"]) < 1e-6
    _check_ci(fid)
    assert fid["n"] == N and fid["higher_is_better"] is False
    ref_bytes = cell.b.numpy().tobytes()  # the reference is hashed as uint8 NCHW
    assert fid["reference"]["n"] == N and fid["reference"]["kind"] == "array"
    assert fid["reference"]["sha256"] == hashlib.sha256(
        f"torch.uint8:{tuple(cell.b.shape)}:".encode() + ref_bytes).hexdigest()
    assert fid["extractor"]["weights_sha256"] == WEIGHTS_SHA256
    assert fid["extractor"]["class"].endswith("FeatureExtractorInceptionV3")


@needs_data
def test_kid_equals_torch_fidelity(cell, theirs):
    out = plugin.KID(reference="ref.npy", weights=str(WEIGHTS), subsets=KID_SUBSETS,
                     subset_size=KID_SUBSET_SIZE).compute(cell.a, cell.ctx)["kid"]
    assert _rel(out["value"], theirs["kernel_inception_distance_mean"]) < 1e-6
    assert _rel(out["subset_std"], theirs["kernel_inception_distance_std"]) < 1e-6
    _check_ci(out)


@needs_data
def test_precision_recall_equal_torch_fidelity(cell, theirs):
    out = plugin.PRC(reference="ref.npy", weights=str(WEIGHTS)).compute(cell.a, cell.ctx)
    # torch-fidelity averages the indicators in float32: equal up to its rounding
    assert out["precision"]["value"] == pytest.approx(theirs["precision"], abs=1e-6)
    assert out["recall"]["value"] == pytest.approx(theirs["recall"], abs=1e-6)


@needs_data
def test_fid_to_fp_equals_fid_between_the_sets(cell, theirs):
    ctx = MetricContext(fp_samples=cell.b, is_reference_cell=False, cache_dir=cell.ctx.cache_dir,
                        device=cell.ctx.device, seed=0, base_dir=cell.root, shared=cell.ctx.shared)
    out = plugin.FIDToFP(weights=str(WEIGHTS), bootstrap=10).compute(cell.a, ctx)["fid_to_fp"]
    assert _rel(out["value"], theirs["frechet_inception_distance"]) < 1e-6
    _check_ci(out)
    assert out["reference"]["kind"] == "fp-samples" and out["reference"]["n"] == N


@needs_data
def test_fid_to_fp_on_reference_cell_is_zero_and_seeds_the_cache(cell):
    ctx = MetricContext(fp_samples=None, is_reference_cell=True, cache_dir=cell.root / "cache-ref",
                        device=cell.ctx.device, seed=0, base_dir=cell.root, shared=cell.ctx.shared)
    out = plugin.FIDToFP(weights=str(WEIGHTS)).compute(cell.a, ctx)["fid_to_fp"]
    assert out["value"] == 0.0 and out["ci"] == [0.0, 0.0]
    assert len(list((cell.root / "cache-ref" / "inception").glob("features-*.pt"))) == 1


# ---- sFID ---------------------------------------------------------------------------------------
@needs_data
def test_sfid_features_are_mixed_6d_conv_first_7_channels_nhwc(cell):
    out = plugin.SFID(reference="ref.npy", weights=str(WEIGHTS), bootstrap=0).compute(cell.a, cell.ctx)
    assert out["sfid"]["value"] > 0 and "ci" not in out["sfid"]
    fz = get_featurizer(WEIGHTS, "cpu")
    sets = [v for k, v in cell.ctx.shared.items() if k[0] == "ptqbench.metrics.features"]
    spatial = sets[0].spatial
    assert tuple(spatial.shape) == (N, 2023)
    # An independent capture of the full Mixed_6d 1x1-branch output (after BN and ReLU).
    full = {}
    handle = fz.net.Mixed_6d.branch1x1.register_forward_hook(
        lambda m, i, o: full.setdefault("o", o.clone()))
    try:
        fz(cell.a[:2])
    finally:
        handle.remove()
    o = full["o"]  # (2, 192, 17, 17)
    assert tuple(o.shape) == (2, 192, 17, 17) and (o >= 0).all()
    # (batches of 16 and of 2 may round differently in the last bits)
    c, h, w = 5, 3, 11  # NHWC flattening: index (h * 17 + w) * 7 + c
    assert spatial[1, (h * 17 + w) * 7 + c] == pytest.approx(float(o[1, c, h, w]), rel=1e-5, abs=1e-5)
    nhwc = o[:, :7].permute(0, 2, 3, 1).reshape(2, -1)
    assert torch.allclose(spatial[:2], nhwc, rtol=1e-5, atol=1e-5)


# ---- Inception Score ------------------------------------------------------------------------------
@needs_data
def test_is_unavailable_with_nan_logit_weights(cell):
    out = plugin.IS(weights=str(WEIGHTS)).compute(cell.a, cell.ctx)["is"]
    assert out["value"] is None
    assert "NaN" in out["unavailable"]


@needs_data
def test_is_from_logits_when_the_weights_have_a_classifier(cell, tmp_path):
    from torch_fidelity.metric_isc import isc_features_to_metric

    state = torch.load(WEIGHTS, map_location="cpu", weights_only=True)
    g = torch.Generator().manual_seed(0)
    state["fc.weight"] = torch.randn(state["fc.weight"].shape, generator=g) * 0.05
    state["fc.bias"] = torch.zeros_like(state["fc.bias"])
    path = tmp_path / "with-fc.pth"
    torch.save(state, path)
    ctx = MetricContext(fp_samples=None, is_reference_cell=False, cache_dir=tmp_path / "cache",
                        device=torch.device("cpu"), seed=0, base_dir=tmp_path, shared={})
    out = plugin.IS(weights=str(path), splits=2).compute(cell.a[:6], ctx)["is"]
    # The convolutions are unchanged: the logits are the original pool features times fc.
    pool = [v for k, v in cell.ctx.shared.items() if k[0] == "ptqbench.metrics.features"][0].pool[:6]
    logits = pool.mm(state["fc.weight"].T)
    expected = isc_features_to_metric(logits, splits=2, shuffle=True, rng_seed=2020)
    assert _rel(out["value"], expected["inception_score_mean"]) < 1e-5
    assert out["value"] > 1.0
    _check_ci(out)


# ---- reference cache ------------------------------------------------------------------------------
@needs_data
def test_reference_cache_is_keyed_by_content(tmp_path):
    fz = get_featurizer(WEIGHTS, "cpu")
    imgs = np.array(np.load(CIFAR, mmap_mode="r")[100:103])
    ref = tmp_path / "ref.npy"
    cache = tmp_path / "cache"

    def run(num=None):
        src = open_reference(str(ref), num=num)
        fp, images = fingerprint(src, cache / "fingerprints")
        load = (lambda: images) if images is not None else src.load
        fs, info = cached_features(cache, fp["sha256"], fp["n"], lambda: featurize(load(), fz), fz)
        return fp["sha256"], fs, info["cache"]

    np.save(ref, imgs)
    sha1, fs1, status = run()
    assert status == "miss"
    assert run()[2] == "memory"
    features_mod._memory.clear()
    sha_again, fs_again, status = run()
    assert (sha_again, status) == (sha1, "hit")  # same input from disk
    assert torch.equal(fs_again.pool, fs1.pool)

    imgs[1, 7, 9, 2] ^= 1  # one pixel, one channel, one grey level
    np.save(ref, imgs)
    sha2, fs2, status = run()
    assert sha2 != sha1 and status == "miss"
    assert not torch.equal(fs2.pool, fs1.pool)
    assert len(list((cache / "inception").glob("features-*.pt"))) == 2

    imgs[1, 7, 9, 2] ^= 1  # back to the original bytes (a new file, new mtime): reuse
    np.save(ref, imgs)
    features_mod._memory.clear()
    sha3, _, status = run()
    assert (sha3, status) == (sha1, "hit")
    assert run(num=2)[2] == "miss"  # a different count is a different entry
    assert len(list((cache / "inception").glob("features-*.pt"))) == 3


def test_cache_key_covers_weights_count_and_numerics():
    fz = SimpleNamespace(weights_sha256="w1", channels_last=False)
    base = cache_key("c", 10, fz, False)
    assert base == cache_key("c", 10, fz, False)
    assert len({base, cache_key("c2", 10, fz, False), cache_key("c", 11, fz, False),
                cache_key("c", 10, SimpleNamespace(weights_sha256="w2", channels_last=False), False),
                cache_key("c", 10, SimpleNamespace(weights_sha256="w1", channels_last=True), False),
                cache_key("c", 10, fz, True)}) == 6


# ---- reference loading (no network needed) ---------------------------------------------------------
def test_reference_formats_load_to_the_same_images(tmp_path):
    import pickle

    from PIL import Image

    g = np.random.default_rng(0)
    nchw = g.integers(0, 256, (5, 3, 32, 32), dtype=np.uint8)
    nhwc = nchw.transpose(0, 2, 3, 1).copy()
    np.save(tmp_path / "nhwc.npy", nhwc)
    np.save(tmp_path / "nchw.npy", nchw)
    np.savez(tmp_path / "x.npz", x=nhwc, y=np.arange(5))
    (tmp_path / "png").mkdir()
    for i, im in enumerate(nchw):
        Image.fromarray(im.transpose(1, 2, 0)).save(tmp_path / "png" / f"{i:03d}.png")
    (tmp_path / "cifar").mkdir()
    for b, rows in ((1, nchw[:3]), (2, nchw[3:])):
        with open(tmp_path / "cifar" / f"data_batch_{b}", "wb") as f:
            pickle.dump({b"data": rows.reshape(len(rows), -1), b"labels": [0] * len(rows)}, f)

    hashes = set()
    for name, kind in (("nhwc.npy", "array"), ("nchw.npy", "array"), ("x.npz", "array"),
                       ("png", "images"), ("cifar", "cifar-batches")):
        src = open_reference(name, base_dir=tmp_path)
        assert src.kind == kind
        assert torch.equal(src.load(), torch.from_numpy(nchw)), name
        hashes.add(fingerprint(src)[0]["sha256"])
        assert torch.equal(open_reference(name, tmp_path, num=3).load(), torch.from_numpy(nchw[:3]))
    assert len(hashes) == 1  # same pixels, same identity, whatever the container

    gray = g.integers(0, 256, (4, 28, 28), dtype=np.uint8)
    np.save(tmp_path / "gray.npy", gray)
    assert tuple(open_reference("gray.npy", tmp_path).load().shape) == (4, 1, 28, 28)
    np.save(tmp_path / "float.npy", nchw.astype(np.float32))
    with pytest.raises(PtqbenchError, match="uint8"):
        open_reference("float.npy", tmp_path).load()
    with pytest.raises(PtqbenchError, match="only 5"):
        open_reference("nhwc.npy", tmp_path, num=6).load()
    with pytest.raises(PtqbenchError, match="does not exist"):
        open_reference("missing.npy", tmp_path)


# ---- weights resolution ----------------------------------------------------------------------------
def test_weights_resolution_order_and_offline_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    with pytest.raises(PtqbenchError, match=WEIGHTS_ENV) as err:
        resolve_weights(None, tmp_path, download=False)
    assert "weights" in str(err.value) and HUB_FILENAME in str(err.value)

    hub = tmp_path / "torch-home" / "hub" / "checkpoints" / HUB_FILENAME
    hub.parent.mkdir(parents=True)
    hub.write_bytes(b"hub")
    assert resolve_weights(None, tmp_path, download=False) == hub.resolve()

    env = tmp_path / "env.pth"
    env.write_bytes(b"env")
    monkeypatch.setenv(WEIGHTS_ENV, str(env))
    assert resolve_weights(None, tmp_path) == env.resolve()

    (tmp_path / "suite").mkdir()
    (tmp_path / "suite" / "opt.pth").write_bytes(b"opt")
    assert resolve_weights("opt.pth", tmp_path / "suite") == (tmp_path / "suite" / "opt.pth").resolve()
    with pytest.raises(PtqbenchError, match="does not exist"):
        resolve_weights("nope.pth", tmp_path)


# ---- options and registration ------------------------------------------------------------
def test_options_are_validated():
    with pytest.raises(PtqbenchError, match="reference"):
        plugin.FID()
    with pytest.raises(PtqbenchError, match="unknown option"):
        plugin.FID(reference="x.npy", bootstraps=3)
    with pytest.raises(PtqbenchError, match="bootstrap"):
        plugin.SFID(reference="x.npy", bootstrap=-1)
    with pytest.raises(PtqbenchError, match="batch_size"):
        plugin.IS(batch_size="64")
    with pytest.raises(PtqbenchError, match="must be a bool"):
        plugin.KID(reference="x.npy", tf32=1)
    assert plugin.FIDToFP().cfg["bootstrap"] == 30
    assert plugin.FIDToFP.needs_fp_samples and plugin.PRC(reference="r").cfg["neighborhood"] == 3


def test_plugins_register_under_their_names():
    from ptqbench.registry import Registry

    registered = []
    plugin.register_metrics(register=registered.append)
    assert {c.name for c in registered} == {"fid", "sfid", "kid", "prc", "is", "fid-to-fp"}
    reg = Registry()
    reg.register_module(plugin, "test:inception")
    assert {"fid", "sfid", "kid", "prc", "is", "fid-to-fp"} <= set(reg.names("metrics"))


# ---- Fréchet distance machinery ----------------------------------------------------------
@pytest.mark.parametrize("n1,n2", [(30, 50), (50, 30), (200, 150)])
def test_factored_frechet_distance_matches_torch_fidelity(n1, n2):
    g = np.random.default_rng(n1)
    d = 64
    x = torch.from_numpy(g.standard_normal((n1, d))).float()
    y = torch.from_numpy(g.standard_normal((n2, d)) * 1.5 + 0.3).float()
    sx, sy = statistics(x), statistics(y)
    expected = frechet_distance_torch_fidelity(sx, sy)
    # N < d: torch-fidelity's general eigensolver is noisy in the covariances' null space
    rel = 1e-9 if min(n1, n2) > d else 1e-6
    for a in (Gaussian.from_features(x), Gaussian.from_stats(sx), Gaussian.from_features(x).compact()):
        for b in (Gaussian.from_features(y), Gaussian.from_stats(sy)):
            assert frechet_distance(a, b) == pytest.approx(expected, rel=rel)
    assert np.allclose(sx.sigma, np.cov(x.numpy(), rowvar=False))
    assert np.allclose(sx.mu, x.double().mean(0))
    # a set against itself: 0 up to rounding, whichever factors meet; relative to the
    # covariance's scale, and with N < d (a rank-deficient square root) at the same looser
    # tolerance as above: -2.9e-9 and -7.1e-8 were seen for N = 30, d = 64 (trace ~64),
    # depending on the BLAS threads
    gx = Gaussian.from_features(x)
    scale = float(np.trace(sx.sigma))
    assert frechet_distance(gx, gx) == pytest.approx(0, abs=(1e-9 if n1 > d else 1e-6) * scale)
    assert frechet_distance(gx, Gaussian.from_stats(sx)) == pytest.approx(0, abs=1e-6)


def test_bootstrap_fid_is_reproducible_and_weighted_factor_matches_duplicates():
    g = np.random.default_rng(1)
    x = torch.from_numpy(g.standard_normal((40, 16))).float()
    ref = Gaussian.from_stats(statistics(torch.from_numpy(g.standard_normal((60, 16))).float()))
    assert bootstrap_fid(x, ref, 5, seed=3) == bootstrap_fid(x, ref, 5, seed=3)
    assert bootstrap_fid(x, ref, 5, seed=3) != bootstrap_fid(x, ref, 5, seed=4)
    # a multiplicity-weighted factor is the covariance of the set with rows repeated
    counts = torch.tensor([2, 0, 1, 3] + [1] * 36)
    mu, f = weighted_factor(x.double(), counts)
    rep = x.double().repeat_interleave(counts, dim=0)
    assert torch.allclose(mu, rep.mean(0))
    assert torch.allclose(f.T @ f, torch.from_numpy(np.cov(rep.numpy(), rowvar=False)))
