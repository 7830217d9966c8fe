"""Atomic file writes, and the cleanup of what a killed writer leaves behind.

Every result file is written to a temporary file in the same folder and renamed over its final
name, so a reader sees the old file or the new one, never half of one. A writer killed between the
two (``kill -9``, a node lost mid-write) leaves its temporary file behind. Their names say which
process wrote them (``.NAME.HOST~PID~RANDOM.tmp``), so that :func:`sweep_orphans` can remove the
ones whose writer is dead on this host without touching a live writer's (several workers, or
several runs, may share one results folder; files of other hosts are left alone).
"""
from __future__ import annotations

import json
import os
import re
import secrets
import socket
from pathlib import Path
from typing import Callable

_HOST = socket.gethostname().split(".")[0].replace("~", "-") or "host"
_ORPHAN = re.compile(r"\.(?P<host>[^~/.]+)~(?P<pid>\d+)~[0-9a-f]{8}\.tmp$")


def temp_path(path: Path) -> Path:
    """A temporary name beside ``path`` that names this host and process."""
    return path.with_name(f".{path.name}.{_HOST}~{os.getpid()}~{secrets.token_hex(4)}.tmp")


def atomic_write(path, write: Callable[[Path], None], mode: int = 0o644) -> None:
    """``write(tmp)`` fills a temporary file, which then replaces ``path`` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        write(tmp)
        os.chmod(tmp, mode)  # results are meant to be shared
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path, data: bytes) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "xb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    atomic_write(path, write)


def atomic_write_text(path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path, obj, default=None) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=default,
                                       allow_nan=True))


def atomic_torch_save(obj, path) -> None:
    """``torch.save`` atomically: a kill never leaves half a checkpoint."""
    import torch

    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def sweep_orphans(root) -> list[Path]:
    """Remove the temporary files under ``root`` whose writer, a process of this host, has died;
    returns them. Temporary files of live processes and of other hosts are kept."""
    removed = []
    root = Path(root)
    if not root.is_dir():
        return removed
    for p in root.rglob(".*.tmp"):
        m = _ORPHAN.search(p.name)
        if m is None or m["host"] != _HOST or _alive(int(m["pid"])):
            continue
        try:
            p.unlink()
            removed.append(p)
        except FileNotFoundError:
            pass  # its writer (or another sweep) got there first
    return removed
