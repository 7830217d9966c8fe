"""Unconditional latent diffusion (LDM-4 / LDM-8): ``UNet2DModel`` on the latents of a
``VQModel`` (``vqvae/``) or ``AutoencoderKL`` (``vae/``), with ``scheduler/``.

Latents are divided by the autoencoder config's ``scaling_factor`` before decoding - the
checkpoint's own LDM ``scale_factor``, which ``ptqbench convert-ldm`` writes there (1.0 for the
LSUN-Bedroom VQ model) - or by the ``latent_scale`` option. VQ decoding snaps latents to the
codebook, as the original. Sample with ``kind = "ddim"``, ``spacing = "leading"`` for the LDM
code's DDIM grid (steps_offset 1, final alpha alphas_cumprod[0] from the scheduler config).
Not the deprecated ``LDMPipeline``, which would divide by a 0.18215 these models never used.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ptqbench import Block, ModelAdapter, hookimpl
from ptqbench.adapter_utils import (OnceLoaded, load_component, load_config, to_uint8,
                                    weights_sha256)
from ptqbench.conditioned import unet_blocks
from ptqbench.convert_ldm import apply_attention_heads
from ptqbench.errors import PtqbenchError
from ptqbench_plugins.models.diffusers_unet import resolve_model_path


def autoencoder_subfolder(path: str) -> str:
    """``vqvae`` (VQModel) or ``vae`` (AutoencoderKL): whichever the folder has."""
    p = Path(path)
    if p.is_dir():
        for sub in ("vqvae", "vae"):
            if (p / sub).is_dir():
                return sub
        raise PtqbenchError(f"{path}: no vqvae/ or vae/ folder (the latent model's autoencoder)")
    return "vqvae"  # hub ids: the CompVis LDM repos use vqvae/


class LatentDiffusion(ModelAdapter):
    name = "ldm"
    description = "Unconditional latent diffusion: UNet2DModel + VQModel/AutoencoderKL decoder"
    unet_class = "UNet2DModel"

    def __init__(self, path: str, base_dir: str = ".", latent_scale: Optional[float] = None,
                 autoencoder: Optional[str] = None, revision: Optional[str] = None):
        super().__init__(path=path, latent_scale=latent_scale, autoencoder=autoencoder)
        self.path = resolve_model_path(path, Path(base_dir))
        self.revision = revision
        import diffusers

        self.ae_subfolder = autoencoder or autoencoder_subfolder(self.path)
        if self.ae_subfolder not in ("vqvae", "vae"):
            raise PtqbenchError(f"model option autoencoder must be 'vqvae' or 'vae', got "
                                f"{self.ae_subfolder!r}")
        ae_cls = diffusers.VQModel if self.ae_subfolder == "vqvae" else diffusers.AutoencoderKL
        self.unet_config = load_config(getattr(diffusers, self.unet_class), self.path, "unet",
                                       "UNet", revision)
        self.scheduler_config = load_config(diffusers.DDIMScheduler, self.path, "scheduler",
                                            "scheduler", revision)
        ae_config = load_config(ae_cls, self.path, self.ae_subfolder, "autoencoder", revision)
        self.latent_scale = float(latent_scale if latent_scale is not None
                                  else ae_config.get("scaling_factor", 1.0))
        # a head count recorded by convert-ldm (LSUN-Church: 8 heads at every width)
        self._unet = OnceLoaded(lambda: apply_attention_heads(load_component(
            getattr(diffusers, self.unet_class), self.path, "unet", "UNet", revision,
            low_cpu_mem_usage=False), Path(self.path) / "unet"))
        self._ae = OnceLoaded(lambda: load_component(ae_cls, self.path, self.ae_subfolder,
                                                     "autoencoder", revision,
                                                     low_cpu_mem_usage=False))
        self._ae_device: Optional[nn.Module] = None
        self._identity: Optional[dict] = None

    # ---- loading ------------------------------------------------------------------------
    def load(self, device: torch.device) -> nn.Module:
        return self._unet.copy_to(device)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        size = self.unet_config["sample_size"]
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return (int(self.unet_config["in_channels"]), h, w)

    # ---- calls --------------------------------------------------------------------------
    def denoise(self, model, x, t, cond=None):
        return model(x, t).sample

    def autoencoder(self, device: torch.device) -> nn.Module:
        if self._ae_device is None or next(self._ae_device.parameters()).device != device:
            self._ae_device = self._ae.copy_to(device)
        return self._ae_device

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        # the autoencoder stays in full precision: only the denoiser is benchmarked
        return to_uint8(self.autoencoder(x.device).decode(x / self.latent_scale).sample)

    def unet_of(self, model: nn.Module) -> nn.Module:
        return model

    def block_prefix(self) -> str:
        return ""

    def blocks(self, model: nn.Module) -> list[Block]:
        return unet_blocks(self.unet_of(model), self.block_prefix())

    def first_last_layers(self, model: nn.Module) -> tuple[str, str]:
        return self.block_prefix() + "conv_in", self.block_prefix() + "conv_out"

    def feature_site(self, model: nn.Module) -> nn.Module:
        return self.unet_of(model).mid_block

    def identity(self) -> dict:
        if self._identity is None:
            self._identity = {
                "plugin": self.name, "path": self.path, "revision": self.revision,
                "weights_sha256": weights_sha256(Path(self.path) / "unet"),
                "autoencoder": self.ae_subfolder, "latent_scale": self.latent_scale,
                "autoencoder_sha256": weights_sha256(Path(self.path) / self.ae_subfolder),
                "scheduler": json.loads(json.dumps(self.scheduler_config, default=str)),
                **self.extra_identity(),
            }
        return dict(self._identity)

    def extra_identity(self) -> dict:
        return {}


@hookimpl
def register_models(register):
    register(LatentDiffusion)
