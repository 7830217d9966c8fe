"""Small random diffusers UNets and helpers for tests and the reconstruction benchmark.

Nothing here is used by the pipeline; it keeps the tests free of model files.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import nn

from ..interfaces import Block, CalibSet, ModelAdapter, Weighting


def tiny_unet(sample_size: int = 8, channels=(8, 16), seed: int = 0) -> nn.Module:
    """A random UNet2DModel with a ResNet down block, an attention down block, a mid block with
    attention and the mirrored up blocks (so every kind of unit and the shortcut split occur)."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(sample_size=sample_size, in_channels=3, out_channels=3,
                       block_out_channels=tuple(channels), norm_num_groups=8,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       layers_per_block=1, attention_head_dim=8).eval().requires_grad_(False)


class UNetAdapter(ModelAdapter):
    """Adapter around an in-memory UNet2DModel; blocks() is the diffusers adapter's, optionally
    restricted to the names in ``only``."""

    name = "test-unet"

    def __init__(self, model: Optional[nn.Module] = None, only: Optional[Iterable[str]] = None):
        super().__init__()
        self.model = model
        self.only = None if only is None else list(only)
        self.sample_shape = (3, 8, 8) if model is None else (
            model.config.in_channels, model.config.sample_size, model.config.sample_size)
        self.scheduler_config = {"num_train_timesteps": 1000}

    def load(self, device):
        return self.model.to(device)

    def denoise(self, model, x, t, cond=None):
        return model(x, t).sample

    def blocks(self, model) -> list[Block]:
        from ptqbench_plugins.models.diffusers_unet import DiffusersUNet

        blocks = DiffusersUNet.blocks(self, model)
        if self.only is not None:
            blocks = [b for b in blocks if b.name in self.only]
        return blocks

    def decode(self, x):
        return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


class UniformWeights(Weighting):
    name = "uniform-test"

    def weights(self, idx):
        return None


def random_calib(n: int, shape=(3, 8, 8), num_steps: int = 4, seed: int = 0) -> CalibSet:
    g = torch.Generator().manual_seed(seed)
    step = torch.arange(n) % num_steps
    t = (999 - step * (1000 // num_steps)).long()
    return CalibSet(torch.randn((n,) + tuple(shape), generator=g), t, step)
