"""Inception features of image sets: computed once per cell, cached on disk by content.

- ``sample_features``: features of a cell's samples, memoised in the cell's ``MetricContext.shared``
  dict, so FID, sFID, KID, precision/recall, IS and FID-to-FP of one cell share one forward pass.
- ``cached_features``: features of a fixed image set (a dataset reference, or the FP samples that
  every quantized cell compares with), stored under ``<cache_dir>/inception/`` in a file named by a
  hash of: the images' content hash and count, the weights' content hash, the extractor class,
  the torch-fidelity version and the numerics flags (TF32, channels_last). The file holds the raw
  2048-d pool features (for KID, precision/recall and paired bootstraps) and the FID statistics of
  the pool and sFID features. It is written atomically; an unreadable file counts as a miss and
  is rewritten. The two most recently used sets also stay in memory.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from .fid import FeatureStats, Gaussian, statistics
from ..atomic import atomic_torch_save
from .hashing import sha256_json, sha256_tensor
from .inception import EXTRACTOR_CLASS, InceptionFeaturizer, torch_fidelity_version

CACHE_FORMAT = 1
CACHE_SUBDIR = "inception"
_memory: "OrderedDict[str, FeatureSet]" = OrderedDict()
_memory_lock = threading.Lock()
_MEMORY_ITEMS = 2


@dataclass
class FeatureSet:
    """Inception features of n images; FID statistics are computed lazily and kept."""

    n: int
    pool: torch.Tensor  # (n, 2048) float32
    spatial: Optional[torch.Tensor] = None  # (n, 2023) float32; not kept for cached sets
    logits: Optional[torch.Tensor] = None  # (n, 1008) float32, None without a classifier
    stats_by_kind: dict = field(default_factory=dict)  # "pool" / "spatial" -> FeatureStats
    _compact: dict = field(default_factory=dict, repr=False)  # (kind, device) -> Gaussian

    def raw(self, kind: str) -> Optional[torch.Tensor]:
        return {"pool": self.pool, "spatial": self.spatial}[kind]

    def stats(self, kind: str) -> FeatureStats:
        if kind not in self.stats_by_kind:
            raw = self.raw(kind)
            if raw is None:
                raise KeyError(f"no {kind} features or statistics in this feature set")
            self.stats_by_kind[kind] = statistics(raw)
        return self.stats_by_kind[kind]

    def gaussian(self, kind: str, device: torch.device | str) -> Gaussian:
        """The Fréchet-distance view of the features on ``device``: from the raw features when at
        hand and no more numerous than their dimension (an exact, cheap factor), else a compact
        (d, d) factor, computed once and kept."""
        raw = self.raw(kind)
        if raw is not None and raw.shape[0] <= raw.shape[1]:
            return Gaussian.from_features(raw.to(device))
        key = (kind, str(torch.device(device)))
        if key not in self._compact:
            if raw is not None:
                self._compact[key] = Gaussian.from_features(raw.to(device)).compact()
            else:
                self._compact[key] = Gaussian.from_stats(self.stats(kind), device)
        return self._compact[key]

    def to_cache(self) -> dict:
        return {"format": CACHE_FORMAT, "n": self.n, "pool": self.pool.detach().cpu(),
                "pool_stats": self.stats("pool").to_tensors(),
                "spatial_stats": self.stats("spatial").to_tensors()}

    @classmethod
    def from_cache(cls, d: dict) -> "FeatureSet":
        if d.get("format") != CACHE_FORMAT:
            raise ValueError(f"cache format {d.get('format')} != {CACHE_FORMAT}")
        return cls(int(d["n"]), d["pool"], stats_by_kind={
            "pool": FeatureStats.from_tensors(d["pool_stats"]),
            "spatial": FeatureStats.from_tensors(d["spatial_stats"])})


def featurize(images: torch.Tensor, fz: InceptionFeaturizer, batch_size: int = 200,
              allow_tf32: bool = False) -> FeatureSet:
    """Features of uint8 images (N, C, H, W) in one pass (on the featurizer's device)."""
    f = fz(images, batch_size=batch_size, allow_tf32=allow_tf32)
    return FeatureSet(images.shape[0], f["pool"], f["spatial"], f["logits"])


def tensor_hash(t: torch.Tensor, shared: Optional[dict]) -> str:
    """Content hash of a tensor, memoised per tensor object in ``shared`` (the cell's memo)."""
    if shared is None:
        return sha256_tensor(t)
    key = ("ptqbench.metrics.sha256", id(t))
    entry = shared.get(key)
    if entry is None or entry[0] is not t:
        entry = (t, sha256_tensor(t))  # holding t keeps its id from being reused
        shared[key] = entry
    return entry[1]


def sample_features(images: torch.Tensor, fz: InceptionFeaturizer, shared: Optional[dict],
                    batch_size: int = 200, allow_tf32: bool = False) -> FeatureSet:
    """Features of a cell's samples, computed once per cell (memo in ``shared``)."""
    key = ("ptqbench.metrics.features", fz.weights_sha256, fz.channels_last, allow_tf32,
           tensor_hash(images, shared))
    if shared is not None and key in shared:
        return shared[key]
    fs = featurize(images, fz, batch_size, allow_tf32)
    if shared is not None:
        shared[key] = fs
    return fs


def cache_key(content_sha256: str, n: int, fz: InceptionFeaturizer, allow_tf32: bool) -> str:
    """Everything the cached features depend on, hashed."""
    return sha256_json({"format": CACHE_FORMAT, "content_sha256": content_sha256, "n": n,
                        "extractor": EXTRACTOR_CLASS, "weights_sha256": fz.weights_sha256,
                        "torch_fidelity": torch_fidelity_version(),
                        "tf32": allow_tf32, "channels_last": fz.channels_last})


def cache_file(cache_dir: Path, key: str) -> Path:
    return Path(cache_dir) / CACHE_SUBDIR / f"features-{key[:40]}.pt"


def cached_features(cache_dir: Path, content_sha256: str, n: int,
                    compute: Callable[[], FeatureSet], fz: InceptionFeaturizer,
                    allow_tf32: bool = False) -> tuple[FeatureSet, dict]:
    """Features of a fixed image set identified by ``content_sha256`` and ``n``.

    ``compute()`` (e.g. ``lambda: featurize(load(), fz)``) runs only on a cache miss and must
    return the full features (pool and spatial). Returns the features (CPU pool features and
    statistics, as stored) and {"cache": "memory" | "hit" | "miss", "file": path}.
    """
    key = cache_key(content_sha256, n, fz, allow_tf32)
    path = cache_file(cache_dir, key)
    with _memory_lock:
        fs = _memory.get(key)
        if fs is not None:
            _memory.move_to_end(key)
    status = "memory"
    if fs is None and path.is_file():
        try:
            fs = FeatureSet.from_cache(torch.load(path, map_location="cpu", weights_only=True))
            status = "hit"
        except Exception:  # unreadable or older format: recompute and overwrite
            fs = None
    if fs is None:
        computed = compute()
        if computed.n != n:
            raise RuntimeError(f"expected features of {n} images for {path.name}, got {computed.n}")
        blob = computed.to_cache()
        atomic_torch_save(blob, path)
        fs = FeatureSet.from_cache(blob)
        status = "miss"
    with _memory_lock:
        _memory[key] = fs
        while len(_memory) > _MEMORY_ITEMS:
            _memory.popitem(last=False)
    return fs, {"cache": status, "file": str(path)}
