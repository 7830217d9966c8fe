"""Pixel-space diffusers UNet2DModel (DDPM/DDIM) adapter.

``path`` is a local folder with ``unet/`` and ``scheduler/`` (diffusers layout), a hub id such as
``google/ddpm-cifar10-32`` (needs network the first time), or ``builtin:tiny-mnist`` for the model
that ships inside ptqbench.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ptqbench import Block, ModelAdapter, hookimpl
from ptqbench.errors import PtqbenchError

def builtin_model_dir(name: str) -> Path:
    import ptqbench

    return Path(ptqbench.__file__).resolve().parent / "assets" / name


def resolve_model_path(path: str, base_dir: Path = Path(".")) -> str:
    """builtin:NAME -> the packaged folder; relative folders resolve against the suite's folder;
    anything else that is not an existing folder is treated as a hub id."""
    if path.startswith("builtin:"):
        folder = builtin_model_dir(path.split(":", 1)[1])
        if not folder.is_dir():
            raise PtqbenchError(f"no built-in model {path!r} (looked in {folder})")
        return str(folder)
    p = Path(path).expanduser()
    if not p.is_absolute():
        p = (base_dir / p)
    if p.exists():
        return str(p.resolve())
    if path.startswith((".", "/", "~")) or path.count("/") != 1:
        raise PtqbenchError(f"model folder not found: {p}")
    return path  # hub id


class DiffusersUNet(ModelAdapter):
    name = "diffusers-unet"
    description = "Pixel-space diffusers UNet2DModel + its scheduler (local folder or hub id)"

    def __init__(self, path: str, base_dir: str = ".", subfolder_unet: str = "unet",
                 subfolder_scheduler: str = "scheduler", revision: Optional[str] = None):
        super().__init__(path=path)
        self.path = resolve_model_path(path, Path(base_dir))
        self.subfolder_unet, self.subfolder_scheduler = subfolder_unet, subfolder_scheduler
        self.revision = revision
        self._state: Optional[dict] = None
        self._config: Optional[dict] = None
        self._identity: Optional[dict] = None
        from diffusers import DDPMScheduler

        sched = self._from_pretrained(DDPMScheduler, subfolder_scheduler, "scheduler")
        self.scheduler_config = dict(sched.config)

    def _from_pretrained(self, cls, subfolder: str, what: str, **kwargs):
        """Pipeline layout (``unet/``, ``scheduler/``) first, then the folder itself: hub repos
        such as google/ddpm-cifar10-32 keep the UNet and scheduler configs at their root."""
        local = Path(self.path)
        if local.is_dir() and not (local / subfolder).is_dir():
            attempts = [None]
        else:
            attempts = [subfolder, None]
        errors = []
        for sub in attempts:
            try:
                return cls.from_pretrained(self.path, subfolder=sub, revision=self.revision,
                                           **kwargs)
            except Exception as exc:  # diffusers raises OSError/EnvironmentError/ValueError
                errors.append(f"{sub or '.'}: {exc}")
        raise PtqbenchError(f"cannot load the {what} of {self.path!r}: " + " | ".join(errors))

    # ---- loading ------------------------------------------------------------------------
    def _load_cpu(self) -> nn.Module:
        from diffusers import UNet2DModel

        # low_cpu_mem_usage=False: same result, and no nagging about `accelerate`
        return self._from_pretrained(UNet2DModel, self.subfolder_unet, "UNet2DModel",
                                     low_cpu_mem_usage=False)

    def load(self, device: torch.device) -> nn.Module:
        # Load from disk once; later calls copy the cached weights (cells reuse the model).
        from diffusers import UNet2DModel

        if self._state is None:
            model = self._load_cpu()
            self._config = dict(model.config)
            self._state = {k: v.clone() for k, v in model.state_dict().items()}
        model = UNet2DModel.from_config(self._config)
        model.load_state_dict(self._state)
        return model.to(device).eval().requires_grad_(False)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        if self._config is None:
            self.load(torch.device("cpu"))
        size = self._config["sample_size"]
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return (self._config["in_channels"], h, w)

    # ---- calls --------------------------------------------------------------------------
    def denoise(self, model, x, t, cond=None):
        return model(x, t).sample

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)

    def feature_site(self, model: nn.Module) -> nn.Module:
        return model.mid_block

    def blocks(self, model: nn.Module) -> list[Block]:
        """ResNet and attention blocks in forward order; loose layers (conv_in, samplers, time
        embedding, conv_out) as single-layer units (the listing every diffusers UNet shares)."""
        from ptqbench.conditioned import unet_blocks

        return unet_blocks(model)

    def identity(self) -> dict:
        # hashed once per adapter: it is asked for by every cell and cache key, and the adapter
        # also loads the weights only once, so the hash describes what this run uses
        if self._identity is None:
            self._identity = self._compute_identity()
        return dict(self._identity)

    def _compute_identity(self) -> dict:
        info = {"plugin": self.name, "path": self.path}
        folder = Path(self.path) / self.subfolder_unet
        if not folder.is_dir():
            folder = Path(self.path)  # flat layout (hub DDPM repos) or a hub id (not a folder)
        if folder.is_dir():
            # Content hash of the weights so that a retrained model never reuses stale caches.
            h = hashlib.sha256()
            for f in sorted(folder.iterdir()):
                if f.suffix in (".safetensors", ".bin", ".json"):
                    h.update(f.name.encode())
                    h.update(f.read_bytes())
            info["weights_sha256"] = h.hexdigest()
        else:
            info["revision"] = self.revision
        info["scheduler"] = json.loads(json.dumps(self.scheduler_config, default=str))
        return info


@hookimpl
def register_models(register):
    register(DiffusersUNet)
