"""CompVis latent-diffusion checkpoints -> diffusers folders that the ``ldm``/``ldm-cin`` adapters load.

``convert_ldm(ckpt, config, out)`` reads the original ``model.ckpt`` (state dict under
``state_dict``) and its YAML config (``configs/latent-diffusion/*.yaml``) and writes

- ``unet/``: ``UNet2DModel`` for unconditional models (LSUN-Bedroom LDM-4, LSUN-Church LDM-8) or
  ``UNet2DConditionModel`` for the class-conditional cin256-v2 (spatial transformers on a class
  token); the key map walks the original ``openaimodel.UNetModel`` layout: ResBlocks (scale-shift
  norm or not), legacy ``AttentionBlock`` (one qkv 1x1 conv, heads interleaved as
  [q_h, k_h, v_h] per head), ``SpatialTransformer``, conv or ResBlock down/up samplers;
- ``vqvae/`` (``VQModel``, codebook kept) or ``vae/`` (``AutoencoderKL``), whose
  ``scaling_factor`` is the checkpoint's LDM ``scale_factor`` (1.0 when the config has none);
- ``class_embedder/`` for cin256-v2 (the ``ClassEmbedder`` table, null class last);
- ``scheduler/``: ``DDIMScheduler`` with the LDM schedule (LDM's "linear" = diffusers'
  ``scaled_linear``), ``steps_offset=1``, ``set_alpha_to_one=False``, no clipping.

Attention with a fixed head count at every width (LSUN-Church: 8 heads; diffusers'
``UNet2DModel`` only knows a fixed head *size*) is recorded in ``unet/ptqbench_attention.json``
and applied by the adapter after loading (:func:`apply_attention_heads`).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from .errors import PtqbenchError

UNET_PREFIX = "model.diffusion_model."
AE_PREFIX = "first_stage_model."
COND_PREFIX = "cond_stage_model."
HEADS_FILE = "ptqbench_attention.json"

_RES = (("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("emb_layers.1", "time_emb_proj"),
        ("out_layers.0", "norm2"), ("out_layers.3", "conv2"), ("skip_connection", "conv_shortcut"))


# ------------------------------------------------------------------------------------------
# reading
# ------------------------------------------------------------------------------------------
def read_config(path: Path) -> dict:
    import yaml

    try:
        cfg = yaml.safe_load(Path(path).read_text())
        cfg["model"]["params"]["unet_config"]["params"]
    except FileNotFoundError:
        raise PtqbenchError(f"LDM config not found: {path}") from None
    except (yaml.YAMLError, KeyError, TypeError) as exc:
        raise PtqbenchError(f"{path}: not a latent-diffusion config (model.params.unet_config."
                            f"params missing: {exc})") from None
    return cfg


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise PtqbenchError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        # Lightning checkpoints pickle more than tensors; only for files the user chose
        obj = torch.load(path, map_location="cpu", weights_only=False)
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict) or not any(k.startswith(UNET_PREFIX) for k in sd):
        raise PtqbenchError(f"{path}: no '{UNET_PREFIX}*' weights (not a CompVis LDM checkpoint)")
    return sd


# ------------------------------------------------------------------------------------------
# UNet
# ------------------------------------------------------------------------------------------
def _heads(ch: int, p: dict) -> int:
    nhc = int(p.get("num_head_channels", -1) or -1)
    return ch // nhc if nhc > 0 else int(p.get("num_heads", 1))


def unet_layout(p: dict) -> list[tuple[str, str, str, int]]:
    """(ldm prefix, diffusers prefix, kind, channels) of every module of openaimodel's UNet, kind in
    resblock / attention / transformer / down-op / down-res / up-conv / up-res."""
    mc, mult, nres = p["model_channels"], list(p["channel_mult"]), p["num_res_blocks"]
    attn_res, updown = set(p.get("attention_resolutions", [])), bool(p.get("resblock_updown"))
    attn_kind = "transformer" if p.get("use_spatial_transformer") else "attention"
    out, k, ds = [], 1, 1
    for lvl, m in enumerate(mult):
        ch = mc * m
        for r in range(nres):
            out.append((f"input_blocks.{k}.0", f"down_blocks.{lvl}.resnets.{r}", "resblock", ch))
            if ds in attn_res:
                out.append((f"input_blocks.{k}.1", f"down_blocks.{lvl}.attentions.{r}", attn_kind, ch))
            k += 1
        if lvl != len(mult) - 1:
            kind = "down-res" if updown else "down-op"
            out.append((f"input_blocks.{k}.0", f"down_blocks.{lvl}.downsamplers.0", kind, ch))
            k, ds = k + 1, ds * 2
    ch = mc * mult[-1]
    out += [("middle_block.0", "mid_block.resnets.0", "resblock", ch),
            ("middle_block.1", "mid_block.attentions.0", attn_kind, ch),
            ("middle_block.2", "mid_block.resnets.1", "resblock", ch)]
    k = 0
    for i, lvl in enumerate(reversed(range(len(mult)))):
        ch = mc * mult[lvl]
        for r in range(nres + 1):
            out.append((f"output_blocks.{k}.0", f"up_blocks.{i}.resnets.{r}", "resblock", ch))
            j = 1
            if ds in attn_res:
                out.append((f"output_blocks.{k}.1", f"up_blocks.{i}.attentions.{r}", attn_kind, ch))
                j = 2
            if lvl and r == nres:
                kind = "up-res" if updown else "up-conv"
                out.append((f"output_blocks.{k}.{j}", f"up_blocks.{i}.upsamplers.0", kind, ch))
                ds //= 2
            k += 1
    return out


def convert_unet_state(sd: dict, p: dict) -> dict[str, torch.Tensor]:
    """openaimodel UNet weights (prefix stripped) -> diffusers UNet keys."""
    new: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(src: str, dst: str, fn=None):
        new[dst] = sd[src] if fn is None else fn(sd[src])
        used.add(src)

    for a, b in (("time_embed.0", "time_embedding.linear_1"), ("time_embed.2", "time_embedding.linear_2"),
                 ("input_blocks.0.0", "conv_in"), ("out.0", "conv_norm_out"), ("out.2", "conv_out")):
        for s in ("weight", "bias"):
            take(f"{a}.{s}", f"{b}.{s}")
    for src, dst, kind, ch in unet_layout(p):
        keys = [k for k in sd if k.startswith(src + ".")]
        if not keys:
            raise PtqbenchError(f"checkpoint has no weights for {src} (the config's layout does "
                                "not match the checkpoint)")
        for key in keys:
            rest = key[len(src) + 1:]
            if kind in ("resblock", "down-res", "up-res"):
                for a, b in _RES:
                    if rest.startswith(a + "."):
                        take(key, f"{dst}.{b}{rest[len(a):]}")
            elif kind == "transformer":
                take(key, f"{dst}.{rest}")
            elif kind in ("down-op", "up-conv"):
                take(key, f"{dst}.conv.{rest.split('.', 1)[1]}")
            elif kind == "attention":
                if rest.startswith("norm."):
                    take(key, f"{dst}.group_norm.{rest[5:]}")
                elif rest.startswith("proj_out."):
                    take(key, f"{dst}.to_out.0.{rest[9:]}", lambda t: t.reshape(t.shape[0], -1)
                         if t.dim() > 1 else t)
                elif rest.startswith("qkv."):
                    q, k_, v = _split_legacy_qkv(sd[key], _heads(ch, p))
                    used.add(key)
                    suffix = rest[4:]
                    for name, t in (("to_q", q), ("to_k", k_), ("to_v", v)):
                        new[f"{dst}.{name}.{suffix}"] = t
    missing = sorted(set(sd) - used)
    if missing:
        raise PtqbenchError(f"{len(missing)} UNet weights were not mapped (first: {missing[0]}); "
                            "this checkpoint layout is not supported")
    return new


def _split_legacy_qkv(t: torch.Tensor, heads: int):
    """QKVAttentionLegacy: qkv channels are [q_h, k_h, v_h] per head, heads in order."""
    w = t.reshape(t.shape[0], -1) if t.dim() > 1 else t[:, None]
    d = w.shape[0] // (3 * heads)
    w = w.reshape(heads, 3, d, w.shape[1])
    parts = [w[:, i].reshape(heads * d, -1) for i in range(3)]
    return [x if t.dim() > 1 else x[:, 0] for x in parts]


def unet_config(p: dict) -> tuple[str, dict, Optional[int]]:
    """(diffusers class name, config, fixed head count to apply after loading or None)."""
    mc, mult = p["model_channels"], list(p["channel_mult"])
    attn_res = set(p.get("attention_resolutions", []))
    cond = bool(p.get("use_spatial_transformer"))
    updown = bool(p.get("resblock_updown"))
    ds, down, up = 1, [], []
    for lvl in range(len(mult)):
        has = ds in attn_res
        # ResBlock samplers: the plain blocks' ResNet variants (DownBlock2D ignores the type)
        down.append(("CrossAttnDownBlock2D" if cond else "AttnDownBlock2D") if has else
                    ("ResnetDownsampleBlock2D" if updown else "DownBlock2D"))
        up.insert(0, ("CrossAttnUpBlock2D" if cond else "AttnUpBlock2D") if has else
                  ("ResnetUpsampleBlock2D" if updown else "UpBlock2D"))
        if lvl != len(mult) - 1:
            ds *= 2
    common = {"sample_size": p["image_size"], "in_channels": p["in_channels"],
              "out_channels": p["out_channels"], "block_out_channels": [mc * m for m in mult],
              "layers_per_block": p["num_res_blocks"], "down_block_types": down,
              "up_block_types": up, "flip_sin_to_cos": True, "freq_shift": 0,
              "norm_num_groups": 32}
    heads = [_heads(mc * m, p) for m in mult]
    if cond:
        depth = p.get("transformer_depth", 1)
        common.update(cross_attention_dim=p["context_dim"], attention_head_dim=heads,
                      transformer_layers_per_block=depth,
                      use_linear_projection=bool(p.get("use_linear_in_transformer", False)))
        if p.get("use_scale_shift_norm") or p.get("resblock_updown"):
            raise PtqbenchError("cross-attention UNets with scale-shift norm or ResBlock up/down "
                                "samplers are not supported")
        return "UNet2DConditionModel", common, None
    nhc = int(p.get("num_head_channels", -1) or -1)
    widths = [mc * m for m in mult]
    common.update(
        resnet_time_scale_shift="scale_shift" if p.get("use_scale_shift_norm") else "default",
        downsample_type="resnet" if updown else "conv",
        upsample_type="resnet" if updown else "conv",
        # a fixed head size; a fixed head count instead is applied after loading (HEADS_FILE)
        attention_head_dim=nhc if nhc > 0 else math.gcd(*widths),
        add_attention=True, attn_norm_num_groups=32)
    return "UNet2DModel", common, (None if nhc > 0 else int(p.get("num_heads", 1)))


def apply_attention_heads(unet: nn.Module, folder: Path) -> nn.Module:
    """Set the head count that ``convert_ldm`` recorded (a fixed count at every width)."""
    f = Path(folder) / HEADS_FILE
    if not f.is_file():
        return unet
    heads = int(json.loads(f.read_text())["heads"])
    from diffusers.models.attention_processor import Attention

    for m in unet.modules():
        if isinstance(m, Attention):
            inner = m.to_q.out_features
            m.heads = heads
            m.scale = (inner // heads) ** -0.5
    return unet


# ------------------------------------------------------------------------------------------
# autoencoder, class embedding, scheduler
# ------------------------------------------------------------------------------------------
def autoencoder_config(ae: dict, scale: float) -> tuple[str, dict]:
    p = ae["params"]
    dd = p["ddconfig"]
    n = len(dd["ch_mult"])
    common = {"in_channels": dd["in_channels"], "out_channels": dd["out_ch"],
              "block_out_channels": [dd["ch"] * m for m in dd["ch_mult"]],
              "layers_per_block": dd["num_res_blocks"],
              "down_block_types": ["DownEncoderBlock2D"] * n,
              "up_block_types": ["UpDecoderBlock2D"] * n,
              "sample_size": dd["resolution"], "scaling_factor": float(scale)}
    if dd.get("attn_resolutions"):
        raise PtqbenchError("autoencoders with attention inside the down/up blocks are not supported")
    if "VQModel" in ae["target"]:
        common.update(latent_channels=dd["z_channels"], num_vq_embeddings=p["n_embed"],
                      vq_embed_dim=p["embed_dim"])
        return "VQModel", common
    common.update(latent_channels=p["embed_dim"])
    return "AutoencoderKL", common


def convert_autoencoder_state(sd: dict, cls_name: str, config: dict) -> dict:
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    ae = {k[len(AE_PREFIX):]: v for k, v in sd.items() if k.startswith(AE_PREFIX)}
    ae = {k: v for k, v in ae.items() if not k.startswith("loss.")}
    new = convert_ldm_vae_checkpoint({"first_stage_model." + k: v for k, v in ae.items()},
                                     config)
    if cls_name == "VQModel":
        new["quantize.embedding.weight"] = ae["quantize.embedding.weight"]
    return new


def scheduler_config(params: dict) -> dict:
    return {"num_train_timesteps": int(params.get("timesteps", 1000)),
            "beta_start": float(params.get("linear_start", 0.0015)),
            "beta_end": float(params.get("linear_end", 0.0195)),
            "beta_schedule": "scaled_linear", "clip_sample": False, "set_alpha_to_one": False,
            "steps_offset": 1, "prediction_type": "epsilon"}


# ------------------------------------------------------------------------------------------
# the whole conversion
# ------------------------------------------------------------------------------------------
def convert_ldm(ckpt: Path, config: Path, out: Path) -> dict:
    import diffusers

    cfg = read_config(config)
    sd = read_checkpoint(ckpt)
    params = cfg["model"]["params"]
    if params.get("parameterization", "eps") != "eps":
        raise PtqbenchError(f"{config}: only epsilon-prediction LDMs are supported")
    up = params["unet_config"]["params"]
    unet_sd = {k[len(UNET_PREFIX):]: v for k, v in sd.items() if k.startswith(UNET_PREFIX)}
    cls_name, ucfg, fixed_heads = unet_config(up)
    unet = getattr(diffusers, cls_name)(**ucfg)
    _load_exact(unet, convert_unet_state(unet_sd, up), "UNet")
    out = Path(out)
    unet.save_pretrained(out / "unet")
    if fixed_heads is not None:
        (out / "unet" / HEADS_FILE).write_text(json.dumps({"heads": fixed_heads}))
    ae_cls, ae_cfg = autoencoder_config(params["first_stage_config"],
                                        params.get("scale_factor", 1.0))
    ae = getattr(diffusers, ae_cls)(**ae_cfg)
    _load_exact(ae, convert_autoencoder_state(sd, ae_cls, ae_cfg), "autoencoder")
    ae.save_pretrained(out / ("vqvae" if ae_cls == "VQModel" else "vae"))
    cond = params.get("cond_stage_config")
    info: dict[str, Any] = {"unet": cls_name, "autoencoder": ae_cls,
                            "scale_factor": ae_cfg["scaling_factor"], "heads": fixed_heads}
    if isinstance(cond, dict) and "ClassEmbedder" in str(cond.get("target", "")):
        from ptqbench_plugins.models.ldm_cin import EMBEDDER_DIR, save_class_embedder

        w = sd[COND_PREFIX + "embedding.weight"]
        emb = nn.Embedding(*w.shape)
        emb.weight.data.copy_(w)
        save_class_embedder(emb, out / EMBEDDER_DIR)
        info["classes"] = int(w.shape[0])
    elif cls_name == "UNet2DConditionModel":
        raise PtqbenchError(f"{config}: conditioning {cond!r} is not supported (class-conditional "
                            "ClassEmbedder only; text-to-image models load from their hub ids)")
    diffusers.DDIMScheduler.from_config(scheduler_config(params)).save_pretrained(out / "scheduler")
    (out / "ptqbench_conversion.json").write_text(json.dumps(
        {"checkpoint": str(ckpt), "config": str(config), **info}, indent=1))
    return info


def _load_exact(module: nn.Module, state: dict, what: str) -> None:
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise PtqbenchError(f"{what}: converted weights do not fit the diffusers model "
                            f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
