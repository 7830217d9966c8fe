"""Results store: one JSON record per cell and sharded sample arrays, all written atomically.

Layout of an output folder::

    records/<cell key>.json        one per finished (or failed) cell
    samples/<gen key>/<start>.npy  uint8 samples, one shard per batch, named by first index
    work/<quant key>/              quantized-model checkpoints (resume after a kill)
    cache/                         trajectories and reference statistics (shared)
    locks/                         advisory locks of parallel workers (safe to delete when idle)
    slurm/                         submissions of the slurm executor (job ids) and their logs

A file appears under its final name only once complete (temp file + fsync + rename), so a run
killed at any point leaves either the old state or the new one, never a broken file. Many
workers on many hosts may write one folder: see :mod:`ptqbench.locks` for the rule.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from .atomic import atomic_write_bytes
from .atomic import atomic_write_json as _atomic_json
from .locks import exclusive_lock, is_locked


def atomic_write_json(path: Path, obj) -> None:
    _atomic_json(path, obj, default=json_value)


def json_value(o):
    """How a record stores what JSON has no type for (numpy scalars and arrays, paths)."""
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return str(o)


class Store:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    # ---- records ------------------------------------------------------------------------
    def record_path(self, key: str) -> Path:
        return self.root / "records" / f"{key}.json"

    def read_record(self, key: str) -> Optional[dict]:
        path = self.record_path(key)
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            return None  # cannot happen with atomic writes; treat as absent to be safe

    def write_record(self, key: str, record: dict) -> Path:
        path = self.record_path(key)
        atomic_write_json(path, record)
        return path

    def records(self) -> Iterator[dict]:
        folder = self.root / "records"
        for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
            try:
                yield json.loads(path.read_text())
            except json.JSONDecodeError:
                continue

    # ---- samples ------------------------------------------------------------------------
    def samples_dir(self, gen_key: str) -> Path:
        return self.root / "samples" / gen_key

    def write_shard(self, gen_key: str, start: int, images: np.ndarray) -> None:
        import io

        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(images, dtype=np.uint8))
        atomic_write_bytes(self.samples_dir(gen_key) / f"{start:09d}.npy", buf.getvalue())

    def shard_starts(self, gen_key: str) -> dict[int, int]:
        """Finished shards: first index -> number of samples."""
        folder = self.samples_dir(gen_key)
        out = {}
        for p in sorted(folder.glob("*.npy")) if folder.is_dir() else []:
            arr = np.load(p, mmap_mode="r")
            out[int(p.stem)] = arr.shape[0]
        return out

    def has_shard(self, gen_key: str, indices: range) -> bool:
        """Whether a finished shard starts at ``indices.start`` and covers all of ``indices``."""
        path = self.samples_dir(gen_key) / f"{indices.start:09d}.npy"
        try:
            return np.load(path, mmap_mode="r").shape[0] >= len(indices)
        except FileNotFoundError:
            return False

    def load_samples(self, gen_key: str, num_samples: int) -> Optional[np.ndarray]:
        """All ``num_samples`` samples in index order, or None if any is missing.

        Shards may overlap (workers that split the indices differently, e.g. after a batch-size
        change): every sample's bytes are the same in each shard that holds it."""
        shards = self.shard_starts(gen_key)
        parts, nxt = [], 0
        for start in sorted(shards):
            if start > nxt:
                return None
            if start + shards[start] <= nxt:
                continue  # covered already
            arr = np.load(self.samples_dir(gen_key) / f"{start:09d}.npy")
            parts.append(arr[nxt - start:])
            nxt = start + shards[start]
            if nxt >= num_samples:
                break
        if nxt < num_samples:
            return None
        return np.concatenate(parts)[:num_samples]

    def write_shard_report(self, gen_key: str, indices: range, report: dict) -> None:
        """What sampled the range ``indices`` of a sharded cell (where, how long)."""
        path = self.root / "work" / "shards" / gen_key / f"{indices.start:09d}-{indices.stop:09d}.json"
        atomic_write_json(path, {"start": indices.start, "stop": indices.stop, **report})

    def shard_reports(self, gen_key: str) -> list[dict]:
        folder = self.root / "work" / "shards" / gen_key
        out = []
        for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
            try:
                out.append(json.loads(path.read_text()))
            except (OSError, json.JSONDecodeError):
                continue
        return out

    def lock_path(self, name: str) -> Path:
        return self.root / "locks" / f"{name}.lock"

    def lock(self, name: str, blocking: bool = True):
        """Exclusive lock ``locks/<name>.lock`` (e.g. a chunk of samples: one writer); with
        ``blocking=False`` it yields False instead of waiting when another worker holds it."""
        return exclusive_lock(self.lock_path(name), blocking=blocking)

    def is_locked(self, name: str) -> bool:
        return is_locked(self.lock_path(name))

    def work_dir(self, quant_key: str) -> Path:
        return self.root / "work" / quant_key
