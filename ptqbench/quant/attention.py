"""Attention processor with quantized matmuls, installed through diffusers' processor API.

Q·Kᵀ quantizes its two inputs (query, key) and softmax·V quantizes the probabilities (unsigned:
they lie in [0, 1]) and the values, each with its own activation quantizer (Q-Diffusion's
QKMatMul / SMVMatMul). The projections to_q/to_k/to_v/to_out are QuantLayers replaced separately.
The math mirrors diffusers' AttnProcessor2_0 with the fused SDPA written out so the probabilities
are visible.
"""
from __future__ import annotations

import torch
from torch import nn

from .lsq import ActQuantizer


class QuantAttnProcessor(nn.Module):
    def __init__(self, matmul_bits: int, softmax_bits: int, act_mode: str = "asymmetric",
                 act_steps: int = 1, device=None):
        super().__init__()
        self.q_quant = ActQuantizer(matmul_bits, act_mode, act_steps, device)
        self.k_quant = ActQuantizer(matmul_bits, act_mode, act_steps, device)
        self.v_quant = ActQuantizer(matmul_bits, act_mode, act_steps, device)
        self.p_quant = ActQuantizer(softmax_bits, "unsigned", act_steps, device)

    # diffusers inspects the signature of ``processor.__call__`` to filter keyword arguments
    # (e.g. the ``temb`` that mid-block attention receives), so it must be explicit here.
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, **kwargs):
        return self.forward(attn, hidden_states, encoder_hidden_states, attention_mask, temb)

    def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                temb=None):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        batch_size, seq_len, _ = (hidden_states.shape if encoder_hidden_states is None
                                  else encoder_hidden_states.shape)
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, seq_len, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1,
                                                 attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        dtype = query.dtype
        q, k = self.q_quant(query), self.k_quant(key)
        if attn.upcast_attention:
            q, k = q.float(), k.float()
        scores = torch.matmul(q, k.transpose(-1, -2)) * attn.scale
        if attention_mask is not None:
            scores = scores + attention_mask
        if attn.upcast_softmax:
            scores = scores.float()
        probs = scores.softmax(dim=-1).to(dtype)
        out = torch.matmul(self.p_quant(probs), self.v_quant(value))
        out = out.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(dtype)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def quantizers(self) -> dict[str, ActQuantizer]:
        return {"q": self.q_quant, "k": self.k_quant, "v": self.v_quant, "softmax": self.p_quant}
