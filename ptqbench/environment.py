"""Provenance for records: git commit, a hash of the code that ran, package versions, host."""
from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path

PACKAGES = ("ptqbench", "torch", "torchvision", "diffusers", "torch-fidelity", "numpy", "pluggy",
            "safetensors")


@functools.lru_cache(maxsize=None)
def git_info(start: str = ".") -> dict:
    """Commit of the checkout ptqbench runs from (or the current folder), and whether it is dirty.

    ``PTQBENCH_SOURCE_COMMIT`` names the commit of a copy whose own git metadata is absent or
    stale (a working tree shipped to another machine): it is recorded as given, marked as
    such; the records' ``code`` hashes still identify the sources that actually ran."""
    given = os.environ.get("PTQBENCH_SOURCE_COMMIT")
    if given:
        return {"commit": given, "dirty": None, "source": "PTQBENCH_SOURCE_COMMIT"}
    here = Path(__file__).resolve().parent
    for folder in (here, Path(start).resolve()):
        try:
            commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True,
                                    text=True, timeout=10)
            if commit.returncode != 0:
                continue
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                   cwd=folder, capture_output=True, text=True, timeout=10)
            return {"commit": commit.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
        except (OSError, subprocess.SubprocessError):
            continue
    return {"commit": None, "dirty": None}


def tree_sha256(folder: Path, pattern: str = "*.py") -> tuple[str, int]:
    """SHA-256 over the relative paths and contents of the files under ``folder`` matching
    ``pattern`` (sorted), and how many there are."""
    h = hashlib.sha256()
    files = sorted(p for p in Path(folder).rglob(pattern) if p.is_file())
    for p in files:
        h.update(p.relative_to(folder).as_posix().encode() + b"\0")
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest(), len(files)


@functools.lru_cache(maxsize=None)
def code_identity() -> dict:
    """Hashes of the ptqbench and built-in plugin sources that are running.

    The git commit alone can mislead: a copy of a checkout (a GPU machine's, an installed
    wheel) may carry an older .git or none, and ``dirty`` does not say what changed."""
    import ptqbench
    import ptqbench_plugins

    out = {}
    for mod in (ptqbench, ptqbench_plugins):
        digest, n = tree_sha256(Path(mod.__file__).resolve().parent)
        out[mod.__name__] = {"sha256": digest, "files": n}
    return out


@functools.lru_cache(maxsize=None)
def package_versions() -> dict:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def host_info(device) -> dict:
    info = {"host": platform.node(), "platform": platform.platform(), "device": str(device)}
    try:
        import torch

        if torch.device(device).type == "cuda":
            info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    except Exception:
        pass
    return info
