"""`ptqbench convert-ldm` on random-weight checkpoints built here in the original CompVis key
layout: LSUN-Bedroom-like (legacy attention blocks, fixed head size, VQ), LSUN-Church-like
(scale-shift norm, ResBlock up/down samplers, a fixed head count at every width, KL) and
cin256-v2-like (spatial transformers on a learned class token). The converted UNets are compared
with a reference forward of the original architecture written below from the original code's
equations; the autoencoders by a round trip through the original key layout."""
import math

import pytest
import torch
import torch.nn.functional as F
import yaml
from click.testing import CliRunner

from ptqbench.cli import cli
from ptqbench.convert_ldm import convert_ldm
from ptqbench.errors import PtqbenchError

MC = 32  # model channels (GroupNorm(32) as the original needs multiples of 32)


# ------------------------------------------------------------------------------------------
# the original UNet (openaimodel.UNetModel), functional, on an LDM state dict
# ------------------------------------------------------------------------------------------
class RefUNet:
    """Builds random weights in the original key layout (``build``) and runs the original
    forward (``__call__``), walking the same structure as openaimodel's constructor."""

    def __init__(self, p: dict, seed: int = 0):
        self.p, self.sd, self.g = p, {}, torch.Generator().manual_seed(seed)
        self.building = True
        x = torch.zeros(1, p["in_channels"], 4, 4)
        self(x, torch.zeros(1, dtype=torch.long), torch.zeros(1, 1, p.get("context_dim") or 1))
        self.building = False

    def w(self, key, *shape):
        if self.building and key not in self.sd:
            r = torch.randn(*shape, generator=self.g)
            if len(shape) > 1:
                t = r / math.sqrt(math.prod(shape[1:]))
            else:  # norm scales near 1, biases small
                t = 1 + 0.1 * r if key.endswith("weight") else 0.1 * r
            self.sd[key] = t
        return self.sd[key]

    def conv(self, x, key, cout, k=3, stride=1):
        cin = x.shape[1]
        return F.conv2d(x, self.w(f"{key}.weight", cout, cin, k, k), self.w(f"{key}.bias", cout),
                        stride=stride, padding=k // 2)

    def gn(self, x, key, eps=1e-5):
        c = x.shape[1]
        return F.group_norm(x, 32, self.w(f"{key}.weight", c), self.w(f"{key}.bias", c), eps)

    def lin(self, x, key, cout, bias=True):
        w = self.w(f"{key}.weight", cout, x.shape[-1])
        return F.linear(x, w, self.w(f"{key}.bias", cout) if bias else None)

    def res(self, x, emb, key, cout, up=False, down=False):
        h = F.silu(self.gn(x, f"{key}.in_layers.0"))
        if up:
            h, x = (F.interpolate(t, scale_factor=2, mode="nearest") for t in (h, x))
        if down:
            h, x = F.avg_pool2d(h, 2), F.avg_pool2d(x, 2)
        h = self.conv(h, f"{key}.in_layers.2", cout)
        ss = self.p.get("use_scale_shift_norm", False)
        e = self.lin(F.silu(emb), f"{key}.emb_layers.1", 2 * cout if ss else cout)[..., None, None]
        if ss:
            scale, shift = e.chunk(2, dim=1)
            h = self.gn(h, f"{key}.out_layers.0") * (1 + scale) + shift
        else:
            h = self.gn(h + e, f"{key}.out_layers.0")
        h = self.conv(F.silu(h), f"{key}.out_layers.3", cout)
        skip = x if x.shape[1] == cout else self.conv(x, f"{key}.skip_connection", cout, k=1)
        return skip + h

    def heads(self, ch):
        nhc = self.p.get("num_head_channels", -1)
        return ch // nhc if nhc > 0 else self.p["num_heads"]

    def attn_block(self, x, key):  # AttentionBlock + QKVAttentionLegacy
        b, c, hh, ww = x.shape
        n = self.heads(c)
        xs = self.gn(x, f"{key}.norm").reshape(b, c, -1)
        qkv = F.conv1d(xs, self.w(f"{key}.qkv.weight", 3 * c, c, 1), self.w(f"{key}.qkv.bias", 3 * c))
        q, k, v = qkv.reshape(b * n, 3 * c // n, -1).split(c // n, dim=1)
        s = 1 / math.sqrt(math.sqrt(c // n))
        w = torch.einsum("bct,bcs->bts", q * s, k * s).softmax(-1)
        a = torch.einsum("bts,bcs->bct", w, v).reshape(b, c, -1)
        out = F.conv1d(a, self.w(f"{key}.proj_out.weight", c, c, 1), self.w(f"{key}.proj_out.bias", c))
        return x + out.reshape(b, c, hh, ww)

    def mha(self, x, ctx, key, n):
        c = x.shape[-1]
        q, k, v = (self.lin(t, f"{key}.to_{nm}", c, bias=False)
                   for nm, t in (("q", x), ("k", ctx), ("v", ctx)))
        b, d = x.shape[0], c // n
        q, k, v = (t.reshape(b, -1, n, d).transpose(1, 2) for t in (q, k, v))
        a = ((q @ k.transpose(-1, -2)) * d ** -0.5).softmax(-1) @ v
        return self.lin(a.transpose(1, 2).reshape(b, -1, c), f"{key}.to_out.0", c)

    def ln(self, x, key):
        c = x.shape[-1]
        return F.layer_norm(x, (c,), self.w(f"{key}.weight", c), self.w(f"{key}.bias", c))

    def transformer(self, x, ctx, key):  # SpatialTransformer, depth 1, conv projections
        b, c, hh, ww = x.shape
        n = self.heads(c)
        h = self.conv(self.gn(x, f"{key}.norm", eps=1e-6), f"{key}.proj_in", c, k=1)
        h = h.reshape(b, c, -1).transpose(1, 2)
        blk = f"{key}.transformer_blocks.0"
        h = self.mha(self.ln(h, f"{blk}.norm1"), self.ln(h, f"{blk}.norm1"), f"{blk}.attn1", n) + h
        h = self.mha(self.ln(h, f"{blk}.norm2"), ctx, f"{blk}.attn2", n) + h
        g = self.lin(self.ln(h, f"{blk}.norm3"), f"{blk}.ff.net.0.proj", 8 * c)
        g, gate = g.chunk(2, dim=-1)
        h = self.lin(g * F.gelu(gate), f"{blk}.ff.net.2", c) + h
        h = h.transpose(1, 2).reshape(b, c, hh, ww)
        return self.conv(h, f"{key}.proj_out", c, k=1) + x

    def attention(self, x, ctx, key):
        return self.transformer(x, ctx, key) if self.p.get("use_spatial_transformer") \
            else self.attn_block(x, key)

    def __call__(self, x, t, ctx):
        p = self.p
        half = MC // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
        args = t[:, None].float() * freqs[None]
        temb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        emb = self.lin(F.silu(self.lin(temb, "time_embed.0", 4 * MC)), "time_embed.2", 4 * MC)
        h = self.conv(x, "input_blocks.0.0", MC)
        hs, k, ds = [h], 1, 1
        updown, attn = p.get("resblock_updown", False), set(p["attention_resolutions"])
        for lvl, m in enumerate(p["channel_mult"]):
            for _ in range(p["num_res_blocks"]):
                h = self.res(h, emb, f"input_blocks.{k}.0", MC * m)
                if ds in attn:
                    h = self.attention(h, ctx, f"input_blocks.{k}.1")
                hs.append(h)
                k += 1
            if lvl != len(p["channel_mult"]) - 1:
                h = (self.res(h, emb, f"input_blocks.{k}.0", MC * m, down=True) if updown
                     else self.conv(h, f"input_blocks.{k}.0.op", MC * m, stride=2))
                hs.append(h)
                k, ds = k + 1, ds * 2
        ch = MC * p["channel_mult"][-1]
        h = self.res(h, emb, "middle_block.0", ch)
        h = self.attention(h, ctx, "middle_block.1")
        h = self.res(h, emb, "middle_block.2", ch)
        k = 0
        for lvl in reversed(range(len(p["channel_mult"]))):
            for r in range(p["num_res_blocks"] + 1):
                h = self.res(torch.cat([h, hs.pop()], dim=1), emb, f"output_blocks.{k}.0",
                             MC * p["channel_mult"][lvl])
                j = 1
                if ds in attn:
                    h = self.attention(h, ctx, f"output_blocks.{k}.1")
                    j = 2
                if lvl and r == p["num_res_blocks"]:
                    c = MC * p["channel_mult"][lvl]
                    h = (self.res(h, emb, f"output_blocks.{k}.{j}", c, up=True) if updown else
                         self.conv(F.interpolate(h, scale_factor=2, mode="nearest"),
                                   f"output_blocks.{k}.{j}.conv", c))
                    ds //= 2
                k += 1
        return self.conv(F.silu(self.gn(h, "out.0")), "out.2", p["out_channels"])


# ------------------------------------------------------------------------------------------
# autoencoders in the original key layout (from a diffusers model, names mapped back)
# ------------------------------------------------------------------------------------------
def ldm_autoencoder_state(model, vq: bool) -> dict:
    """The original (taming/ldm Encoder/Decoder) key of every diffusers weight."""
    n = len(model.encoder.down_blocks)
    out = {}
    res = (("conv_shortcut", "nin_shortcut"),)
    for key, t in model.state_dict().items():
        k = key
        for i in range(n):
            k = k.replace(f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block.")
            k = k.replace(f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample.")
            k = k.replace(f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{n - 1 - i}.block.")
            k = k.replace(f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{n - 1 - i}.upsample.")
        k = k.replace("mid_block.resnets.0.", "mid.block_1.").replace("mid_block.resnets.1.", "mid.block_2.")
        k = k.replace("mid_block.attentions.0.", "mid.attn_1.")
        for a, b in (("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."),
                     ("to_out.0.", "proj_out.")):
            if ".attn_1." in k:
                k = k.replace(a, b)
        for a, b in res:
            k = k.replace(a, b)
        k = k.replace("conv_norm_out.", "norm_out.")
        if ".attn_1." in k and t.dim() == 2:
            t = t[:, :, None, None]  # the original attention uses 1x1 convs
        out["first_stage_model." + k] = t.clone()
    return out


def _ae_config(vq: bool, scale=None) -> dict:
    cfg = {"target": "ldm.models.autoencoder." + ("VQModelInterface" if vq else "AutoencoderKL"),
           "params": {"embed_dim": 3 if vq else 4,
                      "ddconfig": {"double_z": not vq, "z_channels": 3 if vq else 4,
                                   "resolution": 16, "in_channels": 3, "out_ch": 3, "ch": 32,
                                   "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": []}}}
    if vq:
        cfg["params"]["n_embed"] = 16
    return cfg


def _diffusers_ae(vq: bool):
    import diffusers

    from ptqbench.convert_ldm import autoencoder_config

    cls, cfg = autoencoder_config(_ae_config(vq), 1.0)
    torch.manual_seed(1)
    return getattr(diffusers, cls)(**cfg)


def write_checkpoint(tmp_path, unet_params: dict, vq: bool, scale=None, classes: int = 0):
    ref = RefUNet(unet_params)
    sd = {"model.diffusion_model." + k: v for k, v in ref.sd.items()}
    ae = _diffusers_ae(vq)
    sd.update(ldm_autoencoder_state(ae, vq))
    params = {"linear_start": 0.0015, "linear_end": 0.0195, "timesteps": 1000,
              "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
                              "params": unet_params},
              "first_stage_config": _ae_config(vq)}
    if scale is not None:
        params["scale_factor"] = scale
    emb = None
    if classes:
        emb = torch.randn(classes, unet_params["context_dim"])
        sd["cond_stage_model.embedding.weight"] = emb
        params["cond_stage_config"] = {"target": "ldm.modules.encoders.modules.ClassEmbedder",
                                       "params": {"embed_dim": unet_params["context_dim"],
                                                  "n_classes": classes}}
    torch.save({"state_dict": sd, "global_step": 7}, tmp_path / "model.ckpt")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"model": {
        "target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": params}}))
    return ref, ae, emb


BEDROOM = {"image_size": 8, "in_channels": 3, "out_channels": 3, "model_channels": MC,
           "attention_resolutions": [2], "num_res_blocks": 1, "channel_mult": [1, 2],
           "num_head_channels": 16}
CHURCH = {"image_size": 8, "in_channels": 4, "out_channels": 4, "model_channels": MC,
          "attention_resolutions": [1, 2], "num_res_blocks": 1, "channel_mult": [1, 2],
          "num_heads": 8, "use_scale_shift_norm": True, "resblock_updown": True}
CIN = {"image_size": 8, "in_channels": 3, "out_channels": 3, "model_channels": MC,
       "attention_resolutions": [2], "num_res_blocks": 1, "channel_mult": [1, 2],
       "num_head_channels": 16, "use_spatial_transformer": True, "transformer_depth": 1,
       "context_dim": 24}


@pytest.mark.parametrize("name,params,vq,scale", [("bedroom", BEDROOM, True, None),
                                                  ("church", CHURCH, False, 0.2277)])
def test_unconditional_checkpoints_convert_and_match_the_original(tmp_path, name, params, vq,
                                                                  scale):
    from ptqbench_plugins.models.ldm import LatentDiffusion

    ref, ae, _ = write_checkpoint(tmp_path, params, vq, scale)
    out = tmp_path / "converted"
    result = CliRunner().invoke(cli, ["convert-ldm", str(tmp_path / "model.ckpt"),
                                      str(tmp_path / "config.yaml"), str(out)])
    assert result.exit_code == 0, result.output
    a = LatentDiffusion(path=str(out))
    assert a.ae_subfolder == ("vqvae" if vq else "vae")
    assert a.latent_scale == pytest.approx(1.0 if scale is None else scale)
    unet = a.load(torch.device("cpu"))
    x = torch.randn(2, params["in_channels"], 8, 8)
    t = torch.tensor([3, 801])
    with torch.no_grad():
        expected = ref(x, t, None)
        torch.testing.assert_close(a.denoise(unet, x, t), expected, atol=2e-5, rtol=1e-4)
        z = torch.randn(1, *a.sample_shape)
        # the converted autoencoder decodes exactly as the one the checkpoint was written from
        torch.testing.assert_close(a.autoencoder(torch.device("cpu")).decode(z).sample,
                                   ae.decode(z).sample)
    cfg = a.scheduler_config
    assert cfg["steps_offset"] == 1 and cfg["set_alpha_to_one"] is False
    assert cfg["beta_schedule"] == "scaled_linear"


def test_cin256_checkpoint_converts_and_matches_the_original(tmp_path):
    from ptqbench_plugins.models.ldm_cin import ClassConditionalLDM

    ref, _, emb = write_checkpoint(tmp_path, CIN, True, None, classes=7)
    info = convert_ldm(tmp_path / "model.ckpt", tmp_path / "config.yaml", tmp_path / "out")
    assert info["unet"] == "UNet2DConditionModel" and info["classes"] == 7
    a = ClassConditionalLDM(path=str(tmp_path / "out"))
    assert a.null_class == 6
    m = a.load(torch.device("cpu"))
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([11, 500]), torch.tensor([2, 6])
    with torch.no_grad():
        expected = ref(x, t, emb[y][:, None])  # ClassEmbedder: one context token per sample
        torch.testing.assert_close(a.denoise(m, x, t, y), expected, atol=2e-5, rtol=1e-4)


def test_bad_inputs_are_one_line_errors(tmp_path):
    (tmp_path / "c.yaml").write_text("model: {params: {}}\n")
    torch.save({"state_dict": {"x": torch.zeros(1)}}, tmp_path / "m.ckpt")
    with pytest.raises(PtqbenchError, match="not a latent-diffusion config"):
        convert_ldm(tmp_path / "m.ckpt", tmp_path / "c.yaml", tmp_path / "o")
    result = CliRunner().invoke(cli, ["convert-ldm", str(tmp_path / "nope.ckpt"),
                                      str(tmp_path / "c.yaml"), str(tmp_path / "o")])
    assert result.exit_code != 0 and "Traceback" not in result.output
