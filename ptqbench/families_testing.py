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


def _tiny_unet2d(latent_channels: int, church_layout: bool):
    from diffusers import UNet2DModel

    # church: scale-shift norm and ResNet down/up samplers, as the LDM-8 checkpoint
    extra = ({"resnet_time_scale_shift": "scale_shift", "downsample_type": "resnet",
              "upsample_type": "resnet", "attn_norm_num_groups": 4} if church_layout else {})
    plain = ("ResnetDownsampleBlock2D", "ResnetUpsampleBlock2D") if church_layout \
        else ("DownBlock2D", "UpBlock2D")
    return UNet2DModel(sample_size=8, in_channels=latent_channels, out_channels=latent_channels,
                       block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                       down_block_types=(plain[0], "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", plain[1]), attention_head_dim=4,
                       **extra)


def _tiny_vq(latent_channels: int = 3, scaling_factor: float = 1.0):
    from diffusers import VQModel

    return VQModel(in_channels=3, out_channels=3, latent_channels=latent_channels,
                   down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                   up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
                   block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4,
                   num_vq_embeddings=16, sample_size=16, scaling_factor=scaling_factor)


def _tiny_kl(latent_channels: int = 4, scaling_factor: float = 0.5):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels,
                         down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                         up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
                         block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4,
                         sample_size=16, scaling_factor=scaling_factor)


def build_ldm(folder: Path, autoencoder: str = "vq", seed: int = 0) -> tuple[Path, str, dict]:
    """Unconditional LDM: ``vq`` = LDM-4 bedroom layout (VQ f2 here, 3 latent channels),
    ``kl`` = LDM-8 church layout (scale-shift norm, resnet up/down samplers, KL, 4 channels)."""
    _seeded(seed)
    if autoencoder == "vq":
        _tiny_unet2d(3, False).save_pretrained(folder / "unet")
        _tiny_vq().save_pretrained(folder / "vqvae")
    else:
        _tiny_unet2d(4, True).save_pretrained(folder / "unet")
        _tiny_kl().save_pretrained(folder / "vae")
    _scheduler(folder, LDM_SCHEDULER, "DDIMScheduler")
    return folder, "ldm", {}


def build_ldm_cin(folder: Path, seed: int = 0) -> tuple[Path, str, dict]:
    """cin256-v2 layout: cross-attention UNet on one learned class token; 5 classes + null."""
    from diffusers import UNet2DConditionModel

    from ptqbench_plugins.models.ldm_cin import EMBEDDER_DIR, save_class_embedder

    _seeded(seed)
    UNet2DConditionModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16),
                         layers_per_block=1, norm_num_groups=4, cross_attention_dim=12,
                         attention_head_dim=4,
                         down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                         up_block_types=("CrossAttnUpBlock2D", "UpBlock2D")
                         ).save_pretrained(folder / "unet")
    save_class_embedder(torch.nn.Embedding(6, 12), folder / EMBEDDER_DIR)
    _tiny_vq().save_pretrained(folder / "vqvae")
    _scheduler(folder, LDM_SCHEDULER, "DDIMScheduler")
    return folder, "ldm-cin", {"guidance_scale": 3.0}


def _byte_vocab() -> dict[str, int]:
    """A character-level CLIP BPE vocabulary (no merges): every byte, as itself and as a word
    end, plus the start/end tokens - enough to tokenize any prompt."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    chars = [chr(c) for c in cs]
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab


SD_SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                "beta_schedule": "scaled_linear", "set_alpha_to_one": False,
                "skip_prk_steps": True, "steps_offset": 1, "clip_sample": False}


def build_sd(folder: Path, seed: int = 0) -> tuple[Path, str, dict]:
    """SD v1 layout: cross-attention UNet, a 2-layer CLIP text encoder (16 tokens), a KL VAE,
    a character-level tokenizer and a prompt file (``prompts.txt``)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    _seeded(seed)
    vocab = _byte_vocab()
    tok = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=16)
    tok.save_pretrained(folder / "tokenizer")
    CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=12, intermediate_size=24, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=16, bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"],
        projection_dim=12)).save_pretrained(folder / "text_encoder")
    UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                         layers_per_block=1, norm_num_groups=4, cross_attention_dim=12,
                         attention_head_dim=4,
                         down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")
                         ).save_pretrained(folder / "unet")
    _tiny_kl(scaling_factor=0.18215).save_pretrained(folder / "vae")
    _scheduler(folder, SD_SCHEDULER, "PNDMScheduler")
    (folder / "prompts.txt").write_text("a red cube on a table\nan astronaut riding a horse\n"
                                        "two cats\n")
    return folder, "stable-diffusion", {"prompts": str(folder / "prompts.txt"),
                                        "guidance_scale": 7.5}


def build_clip(folder: Path, seed: int = 0) -> Path:
    """A tiny CLIPModel (16x16 images, 8-d embeddings) and a char-level tokenizer, for the
    clip-score metric."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    _seeded(seed)
    vocab = _byte_vocab()
    CLIPTokenizer(vocab=vocab, merges=[], model_max_length=16).save_pretrained(folder)
    CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=12, intermediate_size=24,
                         num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=16,
                         bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                         pad_token_id=vocab["<|endoftext|>"]),
        vision_config=dict(image_size=16, patch_size=8, hidden_size=12, intermediate_size=24,
                           num_hidden_layers=1, num_attention_heads=2),
        projection_dim=8)).save_pretrained(folder)
    return folder


def family_suite(tmp_path: Path, folder: Path, plugin: str, options: dict,
                 sampler: str = 'kind = "ddim"\nsteps = 4\nspacing = "uniform"',
                 num_samples: int = 4, methods=("fp", "rtn", "qdiffusion"),
                 bits=("W8A8",), recipe: str = "{}") -> Path:
    """A small suite over one family's tiny instance: fp, rtn and Q-Diffusion on a tiny
    budget, paired metric."""
    import json
    import textwrap

    opts = ", ".join(f"{k} = {json.dumps(v)}" for k, v in options.items())
    suite = Path(tmp_path) / f"family-{plugin}.toml"
    suite.write_text(textwrap.dedent(f"""
        [suite]
        name = "family-{plugin}"
        [models.m]
        plugin = "{plugin}"
        path = "{folder}"
        options = {{ {opts} }}
        [samplers.s]
        """) + sampler + textwrap.dedent(f"""
        [grid]
        models = ["m"]
        samplers = ["s"]
        bits = {json.dumps(list(bits))}
        methods = {json.dumps(list(methods))}
        [evaluation]
        num_samples = {num_samples}
        batch_size = {num_samples}
        metrics = ["paired"]
        [methods.rtn]
        preset = "rtn"
        selector_options = {{ steps = 2, per_step = 4 }}
        recipe = {recipe}
        [methods.qdiffusion]
        preset = "qdiffusion"
        selector_options = {{ steps = 2, per_step = 4 }}
        recipe = {recipe}
        reconstructor_options = {{ iters_w = 4, iters_a = 2, batch_size = 4 }}
        """))
    return suite


#: every family's tiny instance: name -> (builder kwargs, sampler TOML lines)
FAMILIES = {
    "dit": (build_dit, {}, 'kind = "ddim"\nsteps = 4\nspacing = "uniform"'),
    "dit-latent-learned-sigma": (build_dit, {"learned_variance": True, "latent": True},
                                 'kind = "ddpm"\nsteps = 4\nspacing = "linspace"'),
    "ldm-vq": (build_ldm, {"autoencoder": "vq"},
               'kind = "ddim"\nsteps = 4\nspacing = "leading"\neta = 1.0'),
    "ldm-kl": (build_ldm, {"autoencoder": "kl"}, 'kind = "ddim"\nsteps = 4\nspacing = "leading"'),
    "ldm-cin": (build_ldm_cin, {}, 'kind = "ddim"\nsteps = 4\nspacing = "leading"'),
    "stable-diffusion": (build_sd, {}, 'kind = "pndm"\nsteps = 4\nspacing = "leading"'),
}
