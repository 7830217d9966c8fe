"""One-step denoiser error of a weight-quantized model against FP, per weight-range choice.

Activations stay FP (use a W..A32 bit-width), so only the weight grid differs: the range
initialisation (``weight_init``: BRECQ's L_2.4 search 'mse' or 'minmax') and whether the first
and last layer keep 8 bits or take the model's bit-width (``first_last_bits``). Inputs are real
images noised to a few timesteps; the error is the MSE of eps against the FP model's. CPU is
enough (a few minutes for the CIFAR-10 stand-in).

    python benchmarks/weight_range_eps.py MODEL_DIR [--bits W4A32] [--images X.npy] [-n 64]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from ptqbench.quant import QuantRecipe, quantize_model

TIMESTEPS = (999, 700, 400, 100, 20)


def noised(x0: torch.Tensor, scheduler, t: int) -> torch.Tensor:
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(t))
    return scheduler.add_noise(x0, noise, torch.full((len(x0),), t))


def main(argv=None) -> int:
    from diffusers import DDPMScheduler, UNet2DModel

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", type=Path, help="diffusers folder with unet/ and scheduler/")
    ap.add_argument("--bits", default="W4A32")
    ap.add_argument("--images", type=Path,
                    default=Path("../shared/data/cifar10-partial/test_x.npy"),
                    help="uint8 images (N, H, W, C)")
    ap.add_argument("-n", type=int, default=64, help="images per timestep")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    unet = UNet2DModel.from_pretrained(args.model / "unet").eval().requires_grad_(False)
    scheduler = DDPMScheduler.from_pretrained(args.model / "scheduler")
    images = np.load(args.images)[:args.n]
    if images.ndim == 3:  # (N, H, W) grey, e.g. MNIST
        images = images[..., None]
    x0 = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    pad = (unet.config.sample_size - x0.shape[-1]) // 2  # MNIST 28 -> the tiny model's 32
    if pad > 0:
        x0 = torch.nn.functional.pad(x0, (pad,) * 4, value=-1.0)
    inputs = {t: noised(x0, scheduler, t) for t in TIMESTEPS}
    with torch.no_grad():
        fp = {t: unet(x, torch.full((len(x),), t)).sample for t, x in inputs.items()}
    print(f"{args.model.name}, {args.bits}, {args.n} images, eps-MSE against FP at t = "
          + ", ".join(map(str, TIMESTEPS)))
    print("| weight_init | first_last_bits | " + " | ".join(f"t={t}" for t in TIMESTEPS) + " |")
    print("|---|---|" + "---|" * len(TIMESTEPS))
    for init in ("mse", "minmax"):
        for first_last in (8, "same"):
            recipe = QuantRecipe.from_options(bits=args.bits, weight_init=init,
                                              first_last_bits=first_last)
            q, _ = quantize_model(unet, recipe)
            with torch.no_grad():
                errs = [float((q(x, torch.full((len(x),), t)).sample - fp[t]).pow(2).mean())
                        for t, x in inputs.items()]
            print(f"| {init} | {first_last} | " + " | ".join(f"{e:.2e}" for e in errs) + " |",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
