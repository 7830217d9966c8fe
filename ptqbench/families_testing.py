"""Tiny random-initialised instances of every model family, built from config dicts (no
download), saved as the folders their adapters load. Used by the tests and the GPU smoke run.

Each ``build_*`` writes a diffusers folder and returns ``(path, plugin name, model options)``.
"""
from __future__ import annotations

from pathlib import Path

import torch

LINEAR_SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02,
                    "beta_schedule": "linear", "clip_sample": False}
#: the LDM schedule (scaled linear 0.0015..0.0195) with LDM's DDIM conventions
LDM_SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 0.0015, "beta_end": 0.0195,
                 "beta_schedule": "scaled_linear", "clip_sample": False,
                 "set_alpha_to_one": False, "steps_offset": 1}


def _seeded(seed: int):
    torch.manual_seed(seed)


def _scheduler(folder: Path, config: dict, cls_name: str = "DDPMScheduler") -> None:
    import diffusers

    getattr(diffusers, cls_name).from_config(config).save_pretrained(folder / "scheduler")


def build_dit(folder: Path, learned_variance: bool = False, latent: bool = False,
              seed: int = 0) -> tuple[Path, str, dict]:
    """A 2-block DiT on 8x8 inputs (16 tokens, width 16), 5 classes (+ the null class)."""
    from diffusers import AutoencoderKL, DiTTransformer2DModel

    _seeded(seed)
    c = 4 if latent else 3
    DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=c,
        out_channels=2 * c if learned_variance else c, num_layers=2, sample_size=8,
        patch_size=2, num_embeds_ada_norm=5, norm_type="ada_norm_zero",
        norm_elementwise_affine=False).save_pretrained(folder / "transformer")
    _scheduler(folder, LINEAR_SCHEDULER)
    if latent:
        AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                      down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                      up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
                      block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4,
                      sample_size=16).save_pretrained(folder / "vae")
    return folder, "dit", {"guidance_scale": 1.5}
