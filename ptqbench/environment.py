"""Provenance for records: git commit, package versions, host."""
from __future__ import annotations

import functools
import importlib.metadata
import platform
import subprocess
from pathlib import Path

PACKAGES = ("ptqbench", "torch", "torchvision", "diffusers", "torch-fidelity", "numpy", "pluggy",
            "safetensors")


@functools.lru_cache(maxsize=None)
def git_info(start: str = ".") -> dict:
    """Commit of the checkout ptqbench runs from (or the current folder), and whether it is dirty."""
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
