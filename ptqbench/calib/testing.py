"""Tiny, deterministic stand-ins for the calibration tests and for anyone wiring these modules.

- :func:`write_tiny_unet` saves a ~45k-parameter diffusers UNet2DModel + DDPM scheduler folder
  that the ``diffusers-unet`` adapter loads like a real checkpoint.
- :class:`FakeQuantConv` is a conv block with a learnable step size (LSQ-style) and AdaRound-like
  soft-rounding offsets, and :func:`block_context` drives it through a real
  :class:`~ptqbench.interfaces.BlockContext` exactly as the reconstruction loop specifies.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import nn
from torch.func import functional_call

from ..interfaces import Block, BlockContext


def write_tiny_unet(folder: Path, seed: int = 0, sample_size: int = 8, channels: int = 1) -> Path:
    """A random but fixed tiny UNet2DModel (with a mid-block) in diffusers layout."""
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(seed)
    model = UNet2DModel(sample_size=sample_size, in_channels=channels, out_channels=channels,
                        block_out_channels=(8, 16), layers_per_block=1,
                        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                        norm_num_groups=4, attention_head_dim=4)
    folder = Path(folder)
    model.save_pretrained(folder / "unet")
    DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear").save_pretrained(
        folder / "scheduler")
    return folder


class FakeQuantConv(nn.Module):
    """``conv(x, W_q)`` with W_q = s * clamp(floor(W/s0) + h(v), -2^(b-1), 2^(b-1)-1).

    Trainable quantization parameters: ``step`` s (per output channel, LSQ-like) and ``v`` (soft
    rounding, AdaRound's rectified sigmoid h). The integer part is fixed at the initial step s0
    (as AdaRound fixes it), so the block is smooth in both and second derivatives exist.
    """

    def __init__(self, cin: int = 3, cout: int = 4, bits: int = 4, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("weight", torch.randn(cout, cin, 3, 3, generator=g) * 0.5)
        self.register_buffer("bias", torch.randn(cout, generator=g) * 0.1)
        self.bits = bits
        qmax = 2 ** (bits - 1) - 1
        step0 = self.weight.abs().amax(dim=(1, 2, 3), keepdim=True) / qmax
        self.step = nn.Parameter(step0.clone())
        self.register_buffer("w_floor", torch.floor(self.weight / step0))
        rest = self.weight / step0 - self.w_floor
        rest = rest.clamp(0.01, 0.99)
        # v with h(v) = rest at the start, h(v) = clamp(sigmoid(v) * 1.2 - 0.1, 0, 1)
        self.v = nn.Parameter(-torch.log((1.2 / (rest + 0.1)) - 1))

    def quantized_weight(self) -> torch.Tensor:
        lo, hi = -(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1
        h = torch.clamp(torch.sigmoid(self.v) * 1.2 - 0.1, 0, 1)
        w_int = self.w_floor + h
        return self.step * torch.clamp(w_int, lo, hi)

    def forward(self, x: torch.Tensor, temb: Optional[torch.Tensor] = None) -> torch.Tensor:
        y = nn.functional.conv2d(x, self.quantized_weight(), self.bias, padding=1)
        if temb is not None:
            y = y + temb[:, :, None, None]
        return y

    def fp_forward(self, x: torch.Tensor, temb: Optional[torch.Tensor] = None) -> torch.Tensor:
        y = nn.functional.conv2d(x, self.weight, self.bias, padding=1)
        if temb is not None:
            y = y + temb[:, :, None, None]
        return y


def block_context(block: FakeQuantConv, x: torch.Tensor, t: torch.Tensor, step: torch.Tensor,
                  val_x: Optional[torch.Tensor] = None, val_t: Optional[torch.Tensor] = None,
                  val_step: Optional[torch.Tensor] = None, inner_lr: float = 1e-3,
                  iterations: int = 100, batch_size: int = 8,
                  target_noise: float = 0.0) -> BlockContext:
    """A BlockContext over cached inputs/targets, as the reconstruction loop builds it.

    Block inputs are ``(x, temb)`` with a timestep embedding so that samples of different
    timesteps see different loss landscapes (gradient conflict needs that).
    """
    def temb_of(tt: torch.Tensor) -> torch.Tensor:
        freqs = torch.arange(1, block.weight.shape[0] + 1, dtype=torch.float32)
        return torch.sin(tt.float()[:, None] / 1000.0 * freqs * 3.0)

    with torch.no_grad():
        targets = block.fp_forward(x, temb_of(t))
        if target_noise:
            g = torch.Generator().manual_seed(1)
            targets = targets + target_noise * torch.randn(targets.shape, generator=g)
        val_targets = block.fp_forward(val_x, temb_of(val_t)) if val_x is not None else None
    params = {k: p for k, p in block.named_parameters()}

    def forward(p, inputs):
        return functional_call(block, p, inputs)

    return BlockContext(
        block=Block("fake", block, "layer"), params=params, forward=forward,
        calib_inputs=lambda idx: (x[idx], temb_of(t[idx])),
        calib_targets=lambda idx: targets[idx],
        calib_t=t, calib_step=step,
        val_inputs=(lambda idx: (val_x[idx], temb_of(val_t[idx]))) if val_x is not None else None,
        val_targets=(lambda idx: val_targets[idx]) if val_x is not None else None,
        val_t=val_t, val_step=val_step, inner_lr=inner_lr, iterations=iterations,
        batch_size=batch_size)


def per_sample_mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (out - target).pow(2).flatten(1).mean(1)
