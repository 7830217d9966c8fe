#!/usr/bin/env python
"""Train ptqbench's bundled "tiny model": a small pixel-space DDPM on MNIST.

The model is a ``diffusers.UNet2DModel`` working directly on 1x32x32 images
(MNIST digits padded from 28x28 to 32x32), trained with the standard
epsilon-prediction MSE objective under a 1000-step linear-beta DDPM schedule.
It is deliberately tiny (~450k parameters, < 2 MB of fp32 weights) so that the
benchmark's default CPU runs can sample from it quickly, yet it keeps the
structural pieces that quantization code has to handle: 3x3 convolutions,
GroupNorm, timestep-embedding linears, skip concatenations in the up path and
multi-head self-attention (an ``AttnDownBlock2D``/``AttnUpBlock2D`` pair at the
8x8 level plus the mid-block attention).

Outputs (under ``--out``):

* ``unet/``        -- EMA weights, ``UNet2DModel.save_pretrained`` (safetensors)
* ``scheduler/``   -- the ``DDPMScheduler`` config used for training
* ``train_info.json`` -- provenance (data file + sha256, hyper-parameters,
  versions, wall time, parameter count, final loss, ...)
* ``samples_ddim50.png`` -- an 8x8 grid of samples drawn from the EMA model
  with a 50-step deterministic DDIM loop (eta = 0), as a visual sanity check.

Everything is deterministic given ``--seed`` and ``--steps`` (on a given
device / thread count); ``--minutes`` is only a safety cap on wall time and,
if it triggers, the run stops early and ``train_info.json`` says so.

The bundled model was produced with (the exact command is also recorded in
``train_info.json`` under ``"command"``; ~4.6 min on one H200 GPU)::

    python scripts/train_tiny.py --steps 8000 --batch-size 128 --lr 1e-3 \
        --warmup 500 --seed 0 --device cuda --minutes 8 --log-every 1000 --save-every 0

On a 2-core CPU one step at batch 64 takes ~0.33 s when the machine is idle
(batch 128: ~0.7 s), so the same schedule needs roughly 1.5 h there; a
20-minute CPU run (~700-3000 steps) gives mostly noise to rough digits.

Re-draw only the sample grid from an existing model::

    python scripts/train_tiny.py --sample-only
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import diffusers
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "mnist-test" / "test_x.npy"
DEFAULT_OUT = REPO_ROOT / "ptqbench" / "assets" / "tiny-mnist"

# --------------------------------------------------------------------------
# Model / scheduler definitions (kept here so that the script is standalone).
# --------------------------------------------------------------------------

#: UNet2DModel keyword arguments of the tiny model.  Three resolution levels
#: (32x32 -> 16x16 -> 8x8), one ResNet block per level on the way down (two on
#: the way up, as usual), self-attention at the 8x8 level (down, up and mid
#: block), 3 heads of dimension 16 on 48 channels.
UNET_CONFIG = dict(
    sample_size=32,
    in_channels=1,
    out_channels=1,
    block_out_channels=(16, 32, 48),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    attention_head_dim=16,
    norm_num_groups=8,
)

#: Training noise schedule (the classic DDPM one).
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_schedule="linear",
    beta_start=1e-4,
    beta_end=0.02,
    prediction_type="epsilon",
    clip_sample=False,
)


def build_unet() -> UNet2DModel:
    return UNet2DModel(**UNET_CONFIG)


def build_scheduler() -> DDPMScheduler:
    return DDPMScheduler(**SCHEDULER_CONFIG)


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_mnist(path: Path) -> torch.Tensor:
    """Load (N, 28, 28) uint8 digits -> (N, 1, 32, 32) float32 in [-1, 1].

    The 28x28 images are zero-padded by 2 px on every side (black border, i.e.
    -1 after scaling), which is the usual way of getting power-of-two sizes.
    """
    x = np.load(path)
    if x.ndim != 3 or x.shape[1:] != (28, 28) or x.dtype != np.uint8:
        raise ValueError(f"expected (N, 28, 28) uint8 array, got {x.shape} {x.dtype}")
    x = np.pad(x, ((0, 0), (2, 2), (2, 2)), mode="constant", constant_values=0)
    x = torch.from_numpy(x).float().div_(127.5).sub_(1.0)
    return x.unsqueeze(1).contiguous()


def lr_at(step: int, base_lr: float, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up followed by cosine decay down to ``min_ratio * base_lr``.

    Depends only on the step index (not on wall time), so runs are reproducible.
    """
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base_lr * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, step: int, max_decay: float) -> float:
    """EMA with the usual warm-up: decay = min(max_decay, (1 + t) / (10 + t))."""
    decay = min(max_decay, (1.0 + step) / (10.0 + step))
    # one fused multi-tensor op: ema <- ema + (1 - decay) * (model - ema)
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - decay)
    for be, bm in zip(ema.buffers(), model.buffers()):
        be.copy_(bm)
    return decay


def save_model(ema: UNet2DModel, scheduler: DDPMScheduler, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    ema.save_pretrained(out / "unet", safe_serialization=True)
    scheduler.save_pretrained(out / "scheduler")


@torch.no_grad()
def sample_ddim(unet: UNet2DModel, train_sched: DDPMScheduler, n: int, steps: int,
                seed: int, device: torch.device) -> torch.Tensor:
    """Deterministic DDIM (eta = 0) sampling; returns images in [-1, 1]."""
    ddim = DDIMScheduler.from_config(train_sched.config)
    ddim.set_timesteps(steps, device=device)
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn((n, 1, 32, 32), generator=g).to(device)
    for t in ddim.timesteps:
        eps = unet(x, t).sample
        x = ddim.step(eps, t, x, eta=0.0).prev_sample
    return x.clamp(-1, 1)


def save_grid(images: torch.Tensor, path: Path, nrow: int = 8, scale: int = 2) -> None:
    """Write (N, 1, H, W) images in [-1, 1] as an nrow-wide grid PNG (2 px gaps)."""
    from PIL import Image

    imgs = ((images.cpu().float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    n, _, h, w = imgs.shape
    ncol = nrow
    nrows = math.ceil(n / ncol)
    pad = 2
    grid = np.full((nrows * (h + pad) + pad, ncol * (w + pad) + pad), 128, dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, ncol)
        y0, x0 = pad + r * (h + pad), pad + c * (w + pad)
        grid[y0:y0 + h, x0:x0 + w] = imgs[i, 0].numpy()
    img = Image.fromarray(grid, mode="L")
    if scale != 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA,
                   help="(N, 28, 28) uint8 .npy file of MNIST digits")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    p.add_argument("--steps", type=int, default=8000,
                   help="number of optimizer steps (also sets the LR schedule length)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=500, help="LR warm-up steps")
    p.add_argument("--min-lr-ratio", type=float, default=0.1,
                   help="final LR as a fraction of --lr (cosine decay)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--minutes", type=float, default=None,
                   help="wall-clock budget for the training loop; stops early when exceeded")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--save-every", type=int, default=500,
                   help="also write the EMA weights every N steps (0 = only at the end)")
    p.add_argument("--sample-steps", type=int, default=50, help="DDIM steps for the sample grid")
    p.add_argument("--num-samples", type=int, default=64)
    p.add_argument("--no-samples", action="store_true", help="skip the sample grid")
    p.add_argument("--sample-only", action="store_true",
                   help="do not train; load --out and only redraw the sample grid")
    return p.parse_args(argv)


def make_grid(args, unet: UNet2DModel, scheduler: DDPMScheduler, device: torch.device) -> Path:
    unet.eval()
    t0 = time.perf_counter()
    imgs = sample_ddim(unet, scheduler, args.num_samples, args.sample_steps, args.seed, device)
    path = args.out / f"samples_ddim{args.sample_steps}.png"
    save_grid(imgs, path)
    print(f"wrote {path} ({time.perf_counter() - t0:.1f}s)", flush=True)
    return path


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda requested but CUDA is not available")

    if args.sample_only:
        unet = UNet2DModel.from_pretrained(args.out / "unet").to(device)
        scheduler = DDPMScheduler.from_pretrained(args.out / "scheduler")
        make_grid(args, unet, scheduler, device)
        return

    # ---- determinism -----------------------------------------------------
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False

    # ---- data --------------------------------------------------------------
    data = load_mnist(args.data)  # kept on CPU; batches are moved to device
    n_data = data.shape[0]
    print(f"data: {args.data} {tuple(data.shape)}", flush=True)

    # ---- model, EMA, optimizer, noise schedule ---------------------------
    unet = build_unet().to(device)
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    scheduler = build_scheduler()
    n_params = sum(p.numel() for p in unet.parameters())
    print(f"UNet2DModel: {n_params:,} parameters", flush=True)
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    alphas_cumprod = scheduler.alphas_cumprod.to(device)
    T = scheduler.config.num_train_timesteps

    # A dedicated generator drives everything random in the loop (batch order,
    # timesteps, noise), so the run is a pure function of the seed.
    g = torch.Generator(device="cpu").manual_seed(args.seed)
    perm, pos = torch.randperm(n_data, generator=g), 0

    losses: list[float] = []
    stopped_early = False
    step = 0
    t_start = time.perf_counter()
    unet.train()
    for step in range(args.steps):
        # batch: walk through random permutations of the data set (epochs)
        if pos + args.batch_size > n_data:
            perm, pos = torch.randperm(n_data, generator=g), 0
        idx = perm[pos:pos + args.batch_size]
        pos += args.batch_size
        x0 = data[idx].to(device)
        noise = torch.randn(x0.shape, generator=g).to(device)
        t = torch.randint(0, T, (x0.shape[0],), generator=g).to(device)

        # forward diffusion q(x_t | x_0) and epsilon-prediction MSE
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1.0 - a).sqrt() * noise
        loss = F.mse_loss(unet(xt, t).sample, noise)

        lr = lr_at(step, args.lr, args.warmup, args.steps, args.min_lr_ratio)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(unet.parameters(), args.grad_clip)
        opt.step()
        decay = ema_update(ema, unet, step, args.ema_decay)
        losses.append(loss.item())

        elapsed = time.perf_counter() - t_start
        if (step + 1) % args.log_every == 0 or step == 0:
            recent = float(np.mean(losses[-args.log_every:]))
            print(f"step {step + 1:6d}/{args.steps}  loss {recent:.4f}  lr {lr:.2e}  "
                  f"ema {decay:.4f}  {elapsed / (step + 1):.3f}s/step  {elapsed / 60:.1f} min",
                  flush=True)
        if args.save_every and (step + 1) % args.save_every == 0:
            save_model(ema, scheduler, args.out)
        if args.minutes is not None and elapsed > args.minutes * 60 and step + 1 < args.steps:
            print(f"time budget of {args.minutes} min reached after {step + 1} steps", flush=True)
            stopped_early = True
            break
    steps_done = step + 1
    train_seconds = time.perf_counter() - t_start

    # ---- save EMA weights, scheduler, provenance ---------------------------
    save_model(ema, scheduler, args.out)
    weights = args.out / "unet" / "diffusion_pytorch_model.safetensors"
    info = {
        "description": "Tiny pixel-space DDPM (epsilon prediction) on MNIST 32x32 (padded); "
                       "EMA weights. Trained by scripts/train_tiny.py.",
        "command": "python " + " ".join([os.path.relpath(sys.argv[0], REPO_ROOT)] + sys.argv[1:]),
        "data": {
            "file": os.path.relpath(args.data.resolve(), REPO_ROOT),
            "sha256": sha256_of(args.data),
            "shape": list(data.shape),
            "preprocessing": "uint8 28x28 -> zero-pad 2 px each side -> 32x32 -> x/127.5 - 1",
        },
        "unet_config": {k: list(v) if isinstance(v, tuple) else v for k, v in UNET_CONFIG.items()},
        "scheduler_config": SCHEDULER_CONFIG,
        "parameter_count": n_params,
        "weights_file_bytes": weights.stat().st_size,
        "steps_requested": args.steps,
        "steps_done": steps_done,
        "stopped_by_time_budget": stopped_early,
        "batch_size": args.batch_size,
        "epochs": steps_done * args.batch_size / n_data,
        "optimizer": {"name": "AdamW", "lr": args.lr, "warmup_steps": args.warmup,
                      "schedule": f"linear warm-up then cosine to {args.min_lr_ratio} x lr",
                      "weight_decay": args.weight_decay, "grad_clip": args.grad_clip},
        "ema": {"max_decay": args.ema_decay, "warmup": "min(max_decay, (1+t)/(10+t))",
                "saved": "EMA weights"},
        "seed": args.seed,
        "device": args.device,
        "torch_threads": args.threads,
        "wall_time_seconds": round(train_seconds, 1),
        "seconds_per_step": round(train_seconds / steps_done, 4),
        "final_loss": float(np.mean(losses[-100:])),
        "final_loss_note": "mean training MSE over the last 100 steps (uniform random t)",
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "diffusers": diffusers.__version__, "numpy": np.__version__},
        "host": {"platform": platform.platform(), "processor": platform.processor(),
                 "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None},
    }
    with open(args.out / "train_info.json", "w") as f:
        json.dump(info, f, indent=2)
        f.write("\n")
    print(f"saved EMA model to {args.out} ({weights.stat().st_size} bytes of weights); "
          f"final loss {info['final_loss']:.4f}", flush=True)

    # ---- visual sanity check -------------------------------------------------
    if not args.no_samples:
        make_grid(args, ema, scheduler, device)


if __name__ == "__main__":
    main()
