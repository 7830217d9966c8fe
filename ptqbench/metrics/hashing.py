"""Content hashes for metric caches: files, uint8 tensors, and a memo that is safe against races.

Hashing a 91 MB weights file or decoding 50k reference PNGs on every cell would be wasteful, so a
content hash may be memoised by the files' stat signature (path, size, mtime_ns). File systems
store mtimes at a coarse granularity (often a few milliseconds), so a file rewritten twice within
one tick can keep its signature while its content changes. As git does with its index ("racily
clean" entries), a memo entry is trusted only if every file's mtime is older than the moment the
hash was taken minus ``RACY_SECONDS``; otherwise the content is hashed again. A changed input
therefore never reuses a stale hash.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch

from ..atomic import atomic_write_text

#: a memoised hash is trusted only for files last modified this long before it was taken
RACY_SECONDS = 2.0
_CHUNK = 8 << 20


def sha256_file(path: str | Path) -> str:
    """sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_tensor(t: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes (the tensor is copied to the CPU if needed)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    digest = hashlib.sha256(f"{t.dtype}:{tuple(t.shape)}:".encode())
    # A uint8 view makes any dtype hashable through numpy's buffer without another copy.
    digest.update(t.view(torch.uint8).numpy().data if t.numel() else b"")
    return digest.hexdigest()


def sha256_json(obj) -> str:
    """sha256 of a JSON-able object in canonical form (sorted keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def stat_signature(paths: Iterable[str | Path]) -> list[list]:
    """[[resolved path, size, mtime_ns], ...] of the given files, in the given order."""
    out = []
    for p in paths:
        st = os.stat(p)
        out.append([str(Path(p).resolve()), st.st_size, st.st_mtime_ns])
    return out


def _trusted(entry: Optional[dict], signature: list[list]) -> bool:
    if not entry or entry.get("signature") != signature:
        return False
    newest = max((s[2] for s in signature), default=0) / 1e9
    return newest < entry["hashed_at"] - RACY_SECONDS


class HashMemo:
    """Content hashes memoised by stat signature, in memory and optionally in a folder on disk.

    ``get(key, signature, compute)`` returns ``(value, computed)``: ``value`` is what ``compute()``
    returned (a JSON-able dict holding at least the hash) the last time the files had exactly this
    signature, provided that memo is not racy; otherwise ``compute()`` runs again.
    """

    def __init__(self):
        self._entries: dict[str, dict] = {}

    def get(self, key: str, signature: list[list], compute: Callable[[], dict],
            folder: Optional[Path] = None) -> tuple[dict, bool]:
        entry = self._entries.get(key)
        disk = None if folder is None else Path(folder) / f"{sha256_json(key)[:32]}.json"
        if not _trusted(entry, signature) and disk is not None and disk.is_file():
            try:
                entry = json.loads(disk.read_text())
            except (OSError, ValueError):
                entry = None
        if _trusted(entry, signature):
            self._entries[key] = entry
            return entry["value"], False
        hashed_at = time.time()
        value = compute()
        entry = {"key": key, "signature": signature, "hashed_at": hashed_at, "value": value}
        self._entries[key] = entry
        if disk is not None:
            atomic_write_text(disk, json.dumps(entry))
        return value, True
