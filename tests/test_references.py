"""References: ADM reference batches (.npz: arr_0 images, mu/sigma and mu_s/sigma_s statistics),
image folders with class sub-folders, and FID from an ADM file's own statistics."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ptqbench import MetricContext
from ptqbench.errors import PtqbenchError
from ptqbench.metrics.reference import file_statistics, open_reference
from ptqbench_plugins.metrics import inception as plugin

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
WEIGHTS = DATA / "inception" / "weights-inception-2015-12-05-features-only.pth"
CIFAR = DATA / "cifar10-partial" / "train_x.npy"


def _adm_npz(path: Path, images: np.ndarray, mu=None, sigma=None, d_s: int = 5) -> None:
    rng = np.random.default_rng(0)
    mu = rng.normal(size=7) if mu is None else mu
    sigma = np.eye(len(mu)) if sigma is None else sigma
    np.savez(path, arr_0=images, arr_1=np.arange(len(images)), mu=mu, sigma=sigma,
             mu_s=np.zeros(d_s), sigma_s=2 * np.eye(d_s))


def test_adm_batch_images_and_statistics(tmp_path):
    imgs = np.random.default_rng(1).integers(0, 256, (4, 6, 6, 3), dtype=np.uint8)
    _adm_npz(tmp_path / "VIRTUAL_x.npz", imgs, mu=np.arange(3.0), sigma=np.diag([1.0, 2, 3]))
    src = open_reference("VIRTUAL_x.npz", tmp_path)
    assert torch.equal(src.load(), torch.from_numpy(imgs).permute(0, 3, 1, 2))  # arr_0, NCHW
    pool, spatial = file_statistics(src, "pool"), file_statistics(src, "spatial")
    assert pool.mu.tolist() == [0, 1, 2] and np.diag(pool.sigma).tolist() == [1, 2, 3]
    assert pool.n == 4 and spatial.sigma.shape == (5, 5) and spatial.sigma[0, 0] == 2
    np.savez(tmp_path / "plain.npz", arr_0=imgs)
    assert file_statistics(open_reference("plain.npz", tmp_path), "pool") is None
    np.savez(tmp_path / "stats_only.npz", mu=np.zeros(3), sigma=np.eye(3))
    with pytest.raises(PtqbenchError, match="no images"):
        open_reference("stats_only.npz", tmp_path).load()
    np.savez(tmp_path / "bad.npz", arr_0=imgs, mu=np.zeros(3), sigma=np.eye(2))
    with pytest.raises(PtqbenchError, match="expected"):
        file_statistics(open_reference("bad.npz", tmp_path), "pool")


def test_image_folder_with_class_subfolders(tmp_path):
    for cls, value in (("b_class", 200), ("a_class", 10)):
        (tmp_path / "ref" / cls).mkdir(parents=True)
        Image.fromarray(np.full((4, 4, 3), value, np.uint8)).save(tmp_path / "ref" / cls / "0.png")
    src = open_reference("ref", tmp_path)
    assert src.kind == "images"
    images = src.load()
    assert images.shape == (2, 3, 4, 4) and images[0].max() == 10 and images[1].min() == 200


def test_reference_statistics_option_is_checked():
    with pytest.raises(PtqbenchError, match="reference_statistics"):
        plugin.FID(reference="x.npz", reference_statistics="tf")


@pytest.mark.skipif(not (WEIGHTS.is_file() and CIFAR.is_file()),
                    reason=f"needs the shared offline data {WEIGHTS} and {CIFAR}")
def test_fid_from_adm_statistics_equals_fid_from_its_images(tmp_path):
    from ptqbench.metrics.features import featurize
    from ptqbench.metrics.inception import get_featurizer

    train = np.load(CIFAR, mmap_mode="r")
    ref = np.array(train[100:104])
    samples = torch.from_numpy(np.array(train[:4])).permute(0, 3, 1, 2).contiguous()
    fz = get_featurizer(str(WEIGHTS), torch.device("cpu"), False)
    stats = featurize(torch.from_numpy(ref).permute(0, 3, 1, 2).contiguous(), fz).stats("pool")
    _adm_npz(tmp_path / "adm.npz", ref, mu=stats.mu, sigma=stats.sigma)
    ctx = MetricContext(fp_samples=None, is_reference_cell=False, cache_dir=tmp_path / "cache",
                        device=torch.device("cpu"), seed=0, base_dir=tmp_path, shared={})
    from_file = plugin.FID(reference="adm.npz", weights=str(WEIGHTS), bootstrap=0,
                           reference_statistics="file").compute(samples, ctx)["fid"]
    from_images = plugin.FID(reference="adm.npz", weights=str(WEIGHTS),
                             bootstrap=0).compute(samples, ctx)["fid"]
    assert from_file["value"] == pytest.approx(from_images["value"], rel=1e-6)
    assert from_file["reference"]["kind"] == "adm-statistics" and from_file["reference"]["n"] == 4
