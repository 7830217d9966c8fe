"""Class-conditional DiT (diffusers ``DiTTransformer2DModel``), pixel or latent space.

``path`` is a folder (or hub id such as ``facebook/DiT-XL-2-256``) with ``transformer/``,
``scheduler/`` and, for latent models, ``vae/``. Sampling follows the original DiT code rather
than diffusers' ``DiTPipeline``:

- classifier-free guidance runs the conditional and the null-class pass as one batch and guides
  only the first ``guidance_channels`` output channels (3 in the original, which hard-codes it
  for its 4-channel latents); the remaining channels, the learned variance included, come from
  the conditional pass;
- with a learned variance (``out_channels = 2 x in_channels``, DiT-XL/2) the ``ddpm`` sampler
  uses it (``variance_type = learned_range``); ``ddim`` ignores it;
- labels are drawn per sample from (seed, index), uniform over the classes (``labels="random"``,
  as DiT's sampling script) or cycling (``labels="balanced"``); the null class is
  ``num_embeds_ada_norm`` (the extra row that label dropout trains).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ptqbench import Block, ModelAdapter, hookimpl
from ptqbench.adapter_utils import (OnceLoaded, load_component, load_config, per_sample_labels,
                                    to_uint8, weights_sha256)
from ptqbench.errors import PtqbenchError
from ptqbench_plugins.models.diffusers_unet import resolve_model_path


class DiT(ModelAdapter):
    name = "dit"
    description = ("Class-conditional DiT (DiTTransformer2DModel): guidance as the original DiT, "
                   "learned variance, optional VAE")

    def __init__(self, path: str, base_dir: str = ".", guidance_scale: float = 1.5,
                 guidance_channels: Optional[int] = None, labels: str = "random",
                 revision: Optional[str] = None):
        super().__init__(path=path, guidance_scale=guidance_scale,
                         guidance_channels=guidance_channels, labels=labels)
        self.path = resolve_model_path(path, Path(base_dir))
        self.revision = revision
        self.guidance_scale = float(guidance_scale)
        self.labels = labels
        if labels not in ("random", "balanced"):
            raise PtqbenchError(f"model option labels must be 'random' or 'balanced', got {labels!r}")
        from diffusers import DDPMScheduler, DiTTransformer2DModel

        self._transformer = OnceLoaded(lambda: load_component(
            DiTTransformer2DModel, self.path, "transformer", "DiT transformer", revision,
            low_cpu_mem_usage=False))
        cfg = load_config(DiTTransformer2DModel, self.path, "transformer", "DiT transformer",
                          revision)
        self.num_classes = int(cfg["num_embeds_ada_norm"])
        self.null_class = self.num_classes
        in_ch = int(cfg.get("in_channels", 4))
        out_ch = cfg.get("out_channels") or in_ch
        self.learned_variance = int(out_ch) == 2 * in_ch
        self.guidance_channels = int(guidance_channels) if guidance_channels else min(3, in_ch)
        size = cfg["sample_size"]
        self._shape = (in_ch, size, size) if isinstance(size, int) else (in_ch, *size)
        sched = load_component(DDPMScheduler, self.path, "scheduler", "scheduler", revision)
        self.scheduler_config = dict(sched.config)
        if self.learned_variance:
            self.scheduler_config["variance_type"] = "learned_range"
        self._vae = None
        if (Path(self.path) / "vae").is_dir() or not Path(self.path).is_dir():
            from diffusers import AutoencoderKL

            self._vae = OnceLoaded(lambda: load_component(AutoencoderKL, self.path, "vae", "VAE",
                                                          revision, low_cpu_mem_usage=False))
        self._vae_device: Optional[nn.Module] = None
        self._identity: Optional[dict] = None

    # ---- loading ------------------------------------------------------------------------
    def load(self, device: torch.device) -> nn.Module:
        return self._transformer.copy_to(device)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return self._shape

    # ---- conditioning -------------------------------------------------------------------
    def conditioning(self, indices, seed):
        return per_sample_labels(indices, seed, self.num_classes, self.labels)

    def null_conditioning(self, cond):
        return torch.full_like(cond, self.null_class)

    def combine_guidance(self, cond_out, uncond_out):
        g = self.guidance_channels
        guided = uncond_out[:, :g] + self.guidance_scale * (cond_out[:, :g] - uncond_out[:, :g])
        return torch.cat([guided, cond_out[:, g:]], dim=1)

    # ---- calls --------------------------------------------------------------------------
    def denoise(self, model, x, t, cond=None):
        if cond is None:
            cond = torch.full((x.shape[0],), self.null_class, dtype=torch.long, device=x.device)
        return model(x, timestep=t, class_labels=cond).sample

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        if self._vae is None:
            return to_uint8(x)
        if self._vae_device is None or next(self._vae_device.parameters()).device != x.device:
            self._vae_device = self._vae.copy_to(x.device)
        vae = self._vae_device
        return to_uint8(vae.decode(x / vae.config.scaling_factor).sample)

    def blocks(self, model: nn.Module) -> list[Block]:
        out = [Block("pos_embed", model.pos_embed, "layer")]
        out += [Block(f"transformer_blocks.{i}", b, "dit")
                for i, b in enumerate(model.transformer_blocks)]
        out += [Block("proj_out_1", model.proj_out_1, "layer"),
                Block("proj_out_2", model.proj_out_2, "layer")]
        return out

    def first_last_layers(self, model: nn.Module) -> tuple[str, str]:
        return "pos_embed.proj", "proj_out_2"

    def layer_roles(self, model: nn.Module) -> dict[str, str]:
        # the final layer's shift/scale come from proj_out_1: adaLN modulation like norm1.linear
        return {"proj_out_1": "adaln"}

    def feature_site(self, model: nn.Module) -> nn.Module:
        return model.transformer_blocks[len(model.transformer_blocks) // 2]

    def identity(self) -> dict:
        if self._identity is None:
            self._identity = {
                "plugin": self.name, "path": self.path,
                "weights_sha256": weights_sha256(Path(self.path) / "transformer"),
                "revision": self.revision, "scheduler": _jsonable(self.scheduler_config),
                "guidance_scale": self.guidance_scale,
                "guidance_channels": self.guidance_channels, "labels": self.labels,
                "vae_sha256": None if self._vae is None else weights_sha256(Path(self.path) / "vae"),
            }
        return dict(self._identity)


def _jsonable(d: dict) -> dict:
    import json

    return json.loads(json.dumps(d, default=str))


@hookimpl
def register_models(register):
    register(DiT)
