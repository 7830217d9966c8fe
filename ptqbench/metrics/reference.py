"""Reference image sets for FID/sFID/KID/precision-recall: loading and content fingerprints.

A reference is given by the metric option ``reference`` (relative paths resolve against the suite's
folder) and is one of

- an ``.npy`` / ``.npz`` uint8 array: (N, H, W) grayscale, (N, H, W, C) or (N, C, H, W) with
  C in (1, 3); the layout is detected from which axis has 1 or 3 entries (an ``.npz`` must hold
  one array, or one named ``x``, ``images`` or ``arr_0``);
- a folder of ``data_batch_*`` pickles (CIFAR-10's python version: rows of 3072 bytes, RGB planes);
- a folder of PNG/JPEG images (not recursive, sorted by file name, decoded to RGB).

ADM reference batches (``VIRTUAL_imagenet256_labeled.npz``, ``VIRTUAL_lsun_bedroom256.npz``) are
``.npz`` files with the images in ``arr_0`` (NHWC uint8; labels, if any, in ``arr_1``) and the ADM
evaluator's precomputed statistics ``mu``/``sigma`` (pool, 2048-d) and ``mu_s``/``sigma_s``
(spatial, 2023-d): :func:`file_statistics` returns them, and the FID/sFID metrics use them with
``reference_statistics = "file"`` (the default "images" recomputes them from ``arr_0`` with this
project's extractor, so every number comes from one Inception). A folder of images is searched
recursively when it has no image at its top level (ImageNet/LSUN class folders).

``num_reference`` keeps the first N images in that order. Images are normalised to uint8
(N, C, H, W), and the reference is identified by the sha256 of exactly those bytes (shape
included), so two files with the same pixels share a cache entry and one changed pixel does not.
The hash is memoised by the files' stat signature (``hashing.HashMemo``, race-safe, kept in
memory and in a JSON file under the cache folder) so a 50k-image folder is not decoded again for
every cell once its features are cached.
"""
from __future__ import annotations

import json
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..errors import PtqbenchError
from .hashing import HashMemo, sha256_tensor, stat_signature

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_NPZ_KEYS = ("x", "images", "arr_0")
#: precomputed statistics in ADM reference batches, by feature kind
STAT_KEYS = {"pool": ("mu", "sigma"), "spatial": ("mu_s", "sigma_s")}
_NON_IMAGE_KEYS = {"arr_1", "mu", "sigma", "mu_s", "sigma_s"}
_memo = HashMemo()


def to_nchw(arr: np.ndarray, where: str) -> np.ndarray:
    """uint8 (N, C, H, W) from an (N, H, W), (N, H, W, C) or (N, C, H, W) array, C in (1, 3)."""
    if arr.dtype != np.uint8:
        raise PtqbenchError(f"{where}: reference images must be uint8, got {arr.dtype}")
    if arr.ndim == 3:
        arr = arr[:, None]
    if arr.ndim != 4:
        raise PtqbenchError(f"{where}: expected (N, H, W[, C]) or (N, C, H, W) images, "
                            f"got shape {arr.shape}")
    last, second = arr.shape[3] in (1, 3), arr.shape[1] in (1, 3)
    if last and not second:
        arr = arr.transpose(0, 3, 1, 2)
    elif last and second:
        raise PtqbenchError(f"{where}: cannot tell NHWC from NCHW for shape {arr.shape}")
    elif not second:
        raise PtqbenchError(f"{where}: images need 1 or 3 channels, got shape {arr.shape}")
    return np.array(arr, dtype=np.uint8, order="C", copy=True)  # own the bytes (not a memmap view)


def _take(n_available: int, num: Optional[int], where: str) -> int:
    if num is None:
        return n_available
    if num > n_available:
        raise PtqbenchError(f"{where}: num_reference = {num} but the reference has only "
                            f"{n_available} images")
    return num


def _decode(path: Path) -> torch.Tensor:
    """One image file as uint8 RGB (3, H, W), decoded with PIL (torchvision.io if PIL is absent)."""
    try:
        from PIL import Image
    except ImportError:
        from torchvision.io import ImageReadMode, decode_image, read_file

        return decode_image(read_file(str(path)), mode=ImageReadMode.RGB)
    with Image.open(path) as im:
        return torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).contiguous()


@dataclass
class ReferenceSource:
    """Where a reference's images come from: ``kind`` is "array", "cifar-batches" or "images"."""

    path: Path
    kind: str
    files: list[Path]
    num: Optional[int] = None

    def describe(self) -> dict:
        return {"path": str(self.path), "kind": self.kind, "num_reference": self.num}

    def load(self) -> torch.Tensor:
        """The reference images, uint8 (N, C, H, W) on the CPU."""
        where = str(self.path)
        if self.kind == "array":
            arr = self._load_array()
            arr = arr[:_take(arr.shape[0], self.num, where)]
            return torch.from_numpy(to_nchw(np.asarray(arr), where))
        if self.kind == "cifar-batches":
            parts, have = [], 0
            for f in self.files:
                if self.num is not None and have >= self.num:
                    break
                with open(f, "rb") as fh:
                    batch = pickle.load(fh, encoding="bytes")
                data = batch.get(b"data", batch.get("data")) if isinstance(batch, dict) else None
                if data is None:
                    raise PtqbenchError(f"{f}: not a CIFAR python batch (no 'data' entry)")
                parts.append(np.asarray(data, dtype=np.uint8).reshape(-1, 3, 32, 32))
                have += parts[-1].shape[0]
            arr = np.concatenate(parts)
            return torch.from_numpy(np.ascontiguousarray(arr[:_take(arr.shape[0], self.num, where)]))
        files = self.files[:_take(len(self.files), self.num, where)]
        images = [_decode(f) for f in files]
        shapes = {tuple(im.shape) for im in images}
        if len(shapes) != 1:
            raise PtqbenchError(f"{where}: images have different sizes {sorted(shapes)[:3]}...")
        return torch.stack(images)

    def _load_array(self) -> np.ndarray:
        if self.path.suffix.lower() == ".npy":
            return np.load(self.path, mmap_mode="r", allow_pickle=False)
        with np.load(self.path, allow_pickle=False) as z:
            names = [k for k in z.files if k not in _NON_IMAGE_KEYS]
            if not names:
                raise PtqbenchError(f"{self.path}: holds statistics but no images (arr_0); use "
                                    "reference_statistics = \"file\"")
            name = names[0] if len(names) == 1 else next((k for k in _NPZ_KEYS if k in names), None)
            if name is None:
                raise PtqbenchError(f"{self.path}: .npz holds several arrays {names}; name the images "
                                    f"one of {list(_NPZ_KEYS)}")
            return z[name]


def open_reference(option: str, base_dir: Optional[Path] = None,
                   num: Optional[int] = None) -> ReferenceSource:
    """Find and classify a reference given as a path (relative to ``base_dir``)."""
    path = Path(option).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = Path(base_dir) / path
    path = path.resolve()
    if path.is_file():
        if path.suffix.lower() not in (".npy", ".npz"):
            raise PtqbenchError(f"reference {path}: a file reference must be .npy or .npz")
        return ReferenceSource(path, "array", [path], num)
    if not path.is_dir():
        raise PtqbenchError(f"reference {path} does not exist")
    batches = [p for p in path.iterdir() if re.fullmatch(r"data_batch_\d+", p.name)]
    if batches:
        batches.sort(key=lambda p: int(p.name.rsplit("_", 1)[1]))
        return ReferenceSource(path, "cifar-batches", batches, num)
    images = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:  # class sub-folders (ImageNet/LSUN exports): every image below, sorted by path
        images = sorted(p for p in path.rglob("*") if p.is_file()
                        and p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise PtqbenchError(f"reference {path}: no .npy/.npz file, data_batch_* pickles or "
                            f"{'/'.join(IMAGE_SUFFIXES)} images found")
    return ReferenceSource(path, "images", images, num)


def fingerprint(source: ReferenceSource,
                memo_dir: Optional[Path] = None) -> tuple[dict, Optional[torch.Tensor]]:
    """Content fingerprint {"sha256", "n", "shape"} of a reference, and its images if they had to
    be loaded to compute it (None when a trusted memo answered)."""
    loaded: list[torch.Tensor] = []

    def compute() -> dict:
        images = source.load()
        loaded.append(images)
        return {"sha256": sha256_tensor(images), "n": int(images.shape[0]),
                "shape": list(images.shape[1:])}

    key = json.dumps(source.describe(), sort_keys=True)
    value, _ = _memo.get(key, stat_signature(source.files), compute, memo_dir)
    return value, (loaded[0] if loaded else None)


def file_statistics(source: ReferenceSource, kind: str):
    """The precomputed (mu, sigma) of an ADM reference batch for ``kind`` ("pool" or
    "spatial") as FeatureStats, or None when the file has none. ``n`` is the image count of
    ``arr_0`` when present (ADM batches hold 10k or 50k images), else 0."""
    from .fid import FeatureStats

    if source.kind != "array" or source.path.suffix.lower() != ".npz":
        return None
    mu_key, sigma_key = STAT_KEYS[kind]
    with np.load(source.path, allow_pickle=False) as z:
        if mu_key not in z.files or sigma_key not in z.files:
            return None
        mu = np.asarray(z[mu_key], dtype=np.float64)
        sigma = np.asarray(z[sigma_key], dtype=np.float64)
        n = int(z["arr_0"].shape[0]) if "arr_0" in z.files else 0
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise PtqbenchError(f"{source.path}: {mu_key}/{sigma_key} have shapes {mu.shape}/"
                            f"{sigma.shape}, expected (d,) and (d, d)")
    return FeatureStats(mu, sigma, n)
