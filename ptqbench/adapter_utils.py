"""Helpers shared by the model-adapter plugins: loading diffusers components once, hashing
their weights, labels drawn per sample, and images to uint8."""
from __future__ import annotations

import copy
import hashlib
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from .errors import PtqbenchError
from .sampling import sample_seed

#: salt that separates a sample's label stream from its noise stream (same (seed, index))
LABEL_SALT = 0x5EED_1ABE1


def load_component(cls, path: str, subfolder: Optional[str], what: str,
                   revision: Optional[str] = None, **kwargs) -> Any:
    """``cls.from_pretrained(path, subfolder=...)`` with one clear error line on failure."""
    try:
        return cls.from_pretrained(path, subfolder=subfolder, revision=revision, **kwargs)
    except Exception as exc:  # diffusers/transformers raise OSError/ValueError/...
        where = f"{path}/{subfolder}" if subfolder else path
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PtqbenchError(f"cannot load the {what} from {where!r}: {first}") from None


def load_config(cls, path: str, subfolder: Optional[str], what: str,
                revision: Optional[str] = None) -> dict:
    """A component's config without loading its weights."""
    try:
        return dict(cls.load_config(path, subfolder=subfolder, revision=revision))
    except Exception as exc:
        where = f"{path}/{subfolder}" if subfolder else path
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PtqbenchError(f"cannot read the {what} config from {where!r}: {first}") from None


def weights_sha256(folder: Path) -> Optional[str]:
    """Content hash of a component folder's weights and configs (None when not a folder)."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    h = hashlib.sha256()
    for f in sorted(folder.iterdir()):
        if f.suffix in (".safetensors", ".bin", ".json", ".pt"):
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()


class OnceLoaded:
    """Loads a module once (CPU) and hands out fresh copies: cells reuse the weights."""

    def __init__(self, build):
        self._build = build
        self._module: Optional[nn.Module] = None

    @property
    def module(self) -> nn.Module:
        if self._module is None:
            self._module = self._build().eval().requires_grad_(False)
        return self._module

    def copy_to(self, device: torch.device) -> nn.Module:
        return copy.deepcopy(self.module).to(device).eval().requires_grad_(False)


def per_sample_labels(indices: torch.Tensor, seed: int, num_classes: int,
                      mode: str = "random") -> torch.Tensor:
    """Class label of every sample index: ``random`` (uniform, a pure function of
    (seed, index), as DiT/ADM sample labels) or ``balanced`` (index mod num_classes)."""
    idx = torch.as_tensor(indices, dtype=torch.long).flatten()
    if mode == "balanced":
        return idx % num_classes
    if mode != "random":
        raise PtqbenchError(f"labels must be 'random' or 'balanced', got {mode!r}")
    out = [int(torch.randint(num_classes, (1,), generator=torch.Generator().manual_seed(
        sample_seed(seed ^ LABEL_SALT, int(i))))) for i in idx.tolist()]
    return torch.tensor(out, dtype=torch.long)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images -> uint8 (N, C, H, W)."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
