"""QuantRecipe: what gets quantized and how, as a suite or preset states it.

``QuantRecipe.from_options(bits="W4A8", **options)``; every option below can be set from a suite.
Sources of the defaults are in OPTION_DOCS (also shown in errors).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional, Union

from ..errors import PtqbenchError
from .bits import FULL_PRECISION, BitWidths, check_bits, parse_bits
from .quantizer import INIT_METHODS

OPTION_DOCS = {
    "weight_granularity": "'channel' (per output channel, default; BRECQ/Q-Diffusion) or 'tensor'",
    "weight_symmetric": "signed symmetric weight grid (default false: asymmetric, Q-Diffusion)",
    "weight_init": "weight range init: 'mse' (Lp search p=2.4, 80 candidates: BRECQ; default), "
                   "'minmax', 'percentile'",
    "act_symmetric": "signed symmetric activation grid (Q-Diffusion's --a_sym; default false)",
    "act_init": "activation range init on the calibration set: 'mse' (default), 'minmax', "
                "'percentile'",
    "percentile": "percentile for *_init='percentile' (default 0.9999)",
    "mse_p": "p of the Lp range search (default 2.4, BRECQ/LAPQ)",
    "mse_grid": "number of shrinking candidates of the range search (default 80, BRECQ)",
    "act_calib_elements": "activation values kept per quantizer (and per step) for percentile/"
                          "mse init; extrema are always exact (default 262144)",
    "first_last_bits": "bits of weights and inputs of the first (conv_in) and last (conv_out) "
                       "layers: 2..8, 'fp'/16/32 to keep them in full precision, or 'same' to "
                       "quantize them like every other layer (Q-Diffusion's code; default 8, "
                       "BRECQ's set_first_last_layer_to_8bit)",
    "act_params": "'shared' across timesteps (default) or 'per_step': one set per sampler step "
                  "(TFMQ-DM style; needs sampler_steps)",
    "sampler_steps": "number of sampler steps, for act_params='per_step'",
    "split_shortcut": "Q-Diffusion shortcut split: 1x1 shortcut convs of up-block ResNets that "
                      "read concat(features, skip) quantize the two halves separately "
                      "(default false)",
    "quantize_attention": "quantize the attention matmuls Q·Kᵀ and softmax·V (default true)",
    "attn_bits": "bits of the Q, K, V matmul inputs (default: activation bits)",
    "softmax_bits": "bits of the softmax output, unsigned (default 8, Q-Diffusion --sm_abit)",
    "quantize_time_embedding": "quantize the timestep-embedding MLP and the per-block time "
                               "projections (default true, as Q-Diffusion)",
    "quantize_adaln": "quantize adaLN modulation layers (DiT's per-block shift/scale/gate "
                      "linears and final proj_out_1; default true, PTQ4DiT/Q-DiT); false keeps "
                      "them in full precision",
    "quantize_text_encoder": "quantize the text encoder of text-to-image models (default false: "
                             "kept in full precision, as the diffusion-PTQ papers)",
}


@dataclass(frozen=True)
class QuantRecipe:
    bits: BitWidths
    weight_granularity: str = "channel"
    weight_symmetric: bool = False
    weight_init: str = "mse"
    act_symmetric: bool = False
    act_init: str = "mse"
    percentile: float = 0.9999
    mse_p: float = 2.4
    mse_grid: int = 80
    act_calib_elements: int = 262144
    first_last_bits: Union[int, str] = 8
    act_params: str = "shared"
    sampler_steps: Optional[int] = None
    split_shortcut: bool = False
    quantize_attention: bool = True
    attn_bits: Optional[int] = None
    softmax_bits: int = 8
    quantize_time_embedding: bool = True
    quantize_adaln: bool = True
    quantize_text_encoder: bool = False

    # ---- construction ------------------------------------------------------------------
    @classmethod
    def option_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if f.name != "bits"]

    @classmethod
    def from_options(cls, bits: Union[str, BitWidths] = "W8A8", **options: Any) -> "QuantRecipe":
        bw = bits if isinstance(bits, BitWidths) else parse_bits(bits)
        known = set(cls.option_names())
        unknown = sorted(set(options) - known)
        if unknown:
            raise PtqbenchError(f"unknown quantization recipe option(s) {', '.join(unknown)}; "
                                f"known: {', '.join(sorted(known))}")
        return cls(bits=bw, **{k: _check(k, v) for k, v in options.items()}).validated()

    def validated(self) -> "QuantRecipe":
        if self.act_params == "per_step" and self.act_quantized and not self.sampler_steps:
            raise PtqbenchError("recipe option act_params='per_step' needs sampler_steps "
                                "(the number of sampler steps)")
        return self

    # ---- derived -----------------------------------------------------------------------
    @property
    def weight_quantized(self) -> bool:
        return self.bits.weight_quantized

    @property
    def act_quantized(self) -> bool:
        return self.bits.activation_quantized

    @property
    def act_steps(self) -> int:
        return int(self.sampler_steps) if self.act_params == "per_step" else 1

    @property
    def weight_mode(self) -> str:
        return "symmetric" if self.weight_symmetric else "asymmetric"

    @property
    def act_mode(self) -> str:
        return "symmetric" if self.act_symmetric else "asymmetric"

    @property
    def first_last_fp(self) -> bool:
        return self.first_last_bits == "fp" or self.first_last_bits in FULL_PRECISION

    @property
    def matmul_bits(self) -> int:
        return self.attn_bits if self.attn_bits is not None else self.bits.activation

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["bits"] = self.bits.label
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "QuantRecipe":
        d = dict(d)
        return cls.from_options(d.pop("bits"), **d)


def _bool(name, v):
    if isinstance(v, bool):
        return v
    raise PtqbenchError(f"recipe option {name} must be true or false, got {v!r}")


def _choice(name, v, choices):
    if v not in choices:
        raise PtqbenchError(f"recipe option {name} must be one of {', '.join(map(repr, choices))}, "
                            f"got {v!r}")
    return v


def _int(name, v, lo, hi=None):
    if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"in {lo}..{hi}"
        raise PtqbenchError(f"recipe option {name} must be an integer {rng}, got {v!r}")
    return v


def _float(name, v, lo, hi, lo_open=True):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise PtqbenchError(f"recipe option {name} must be a number, got {v!r}")
    if not (lo < v <= hi if lo_open else lo <= v <= hi):
        raise PtqbenchError(f"recipe option {name} must be in {'(' if lo_open else '['}{lo}, "
                            f"{hi}], got {v!r}")
    return float(v)


def _bits_opt(name, v):
    try:
        return check_bits(_int(name, v, 0), name)
    except PtqbenchError as exc:
        raise PtqbenchError(f"recipe option {exc}") from None


def _check(name: str, v: Any) -> Any:
    if name in ("weight_symmetric", "act_symmetric", "split_shortcut", "quantize_attention",
                "quantize_time_embedding", "quantize_adaln", "quantize_text_encoder"):
        return _bool(name, v)
    if name == "weight_granularity":
        return _choice(name, v, ("channel", "tensor"))
    if name in ("weight_init", "act_init"):
        return _choice(name, v, INIT_METHODS)
    if name == "percentile":
        return _float(name, v, 0.5, 1.0)
    if name == "mse_p":
        return _float(name, v, 0.0, 100.0)
    if name == "mse_grid":
        return _int(name, v, 1, 100)
    if name == "act_calib_elements":
        return _int(name, v, 1024)
    if name == "first_last_bits":
        if isinstance(v, str):
            if v.lower() in ("fp", "full"):
                return "fp"
            if v.lower() == "same":
                return "same"
            raise PtqbenchError(f"recipe option first_last_bits must be 2..8, 'fp' or 'same', "
                                f"got {v!r}")
        return _bits_opt(name, v)
    if name == "act_params":
        return _choice(name, v, ("shared", "per_step"))
    if name == "sampler_steps":
        return None if v is None else _int(name, v, 1)
    if name == "attn_bits":
        return None if v is None else _bits_opt(name, v)
    if name == "softmax_bits":
        return _bits_opt(name, v)
    raise PtqbenchError(f"unknown quantization recipe option {name}")  # pragma: no cover
