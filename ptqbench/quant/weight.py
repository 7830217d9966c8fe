"""Weight quantizer: owns the (single) stored copy of a layer's weight in one of three forms.

- ``rtn``:      the FP weight (parameter ``weight``), rounded to nearest in the forward pass;
- ``adaround``: ``w_floor`` = floor(w/s) (buffer) + learnable ``alpha`` (AdaRound); the FP copy
                is dropped because s is fixed while rounding is learned, so floor(w/s) and the
                initial alpha hold all that is needed;
- ``folded``:   integer codes ``w_int`` (uint8 / int8) only; the final, deployable form.
Scale and zero point are per output channel (dim 0) or per tensor, created at construction.
"""
from __future__ import annotations

import torch
from torch import nn

from . import adaround as ar
from .quantizer import init_range, qrange, quantize_codes, round_ste

WEIGHT_FORMS = ("rtn", "adaround", "folded")


class WeightQuantizer(nn.Module):
    def __init__(self, weight: torch.Tensor, bits: int, mode: str = "asymmetric",
                 per_channel: bool = True):
        super().__init__()
        self.bits, self.mode, self.per_channel = int(bits), mode, bool(per_channel)
        self.qmin, self.qmax = qrange(self.bits, mode)
        self.weight_shape = tuple(weight.shape)
        rows = weight.shape[0] if per_channel else 1
        pshape = (rows,) + (1,) * (weight.dim() - 1)
        self.register_buffer("scale", torch.ones(pshape, dtype=torch.float32, device=weight.device))
        self.register_buffer("zero_point", torch.zeros(pshape, dtype=torch.float32,
                                                       device=weight.device))
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.form = "rtn"
        self.soft = True  # adaround: soft (training) or hard rounding

    # ---- range -------------------------------------------------------------------------
    @torch.no_grad()
    def init_range(self, method: str = "mse", percentile: float = 0.9999, p: float = 2.4,
                   grid: int = 80) -> None:
        if self.form != "rtn":
            raise RuntimeError("weight ranges can only be initialised before rounding is learned")
        w = self.weight.detach()
        x2d = w.reshape(w.shape[0], -1) if self.per_channel else w.reshape(1, -1)
        s, z = init_range(x2d, self.bits, self.mode, method, percentile, p, grid)
        self.scale.copy_(s.view_as(self.scale))
        self.zero_point.copy_(z.view_as(self.zero_point))

    # ---- forms -------------------------------------------------------------------------
    def code_dtype(self) -> torch.dtype:
        return torch.int8 if self.qmin < 0 else torch.uint8

    @torch.no_grad()
    def to_adaround(self) -> None:
        """rtn -> adaround: keep floor(w/s) and the alpha that reproduces w exactly."""
        if self.form != "rtn":
            raise RuntimeError(f"cannot start AdaRound from form {self.form!r}")
        w = self.weight.detach().float()
        ws = w / self.scale
        floor = torch.floor(ws)
        alpha = ar.init_alpha(ws - floor)
        del self.weight
        self.register_buffer("w_floor", floor)
        self.alpha = nn.Parameter(alpha)
        self.form, self.soft = "adaround", True

    def _codes(self) -> torch.Tensor:
        if self.form == "rtn":
            return quantize_codes(self.weight, self.scale, self.zero_point, self.qmin, self.qmax)
        if self.form == "adaround":
            h = ar.rectified_sigmoid(self.alpha) if self.soft else ar.hard_rounding(self.alpha)
            return torch.clamp(self.w_floor + h + self.zero_point, self.qmin, self.qmax)
        return self.w_int.to(self.scale.dtype)

    @torch.no_grad()
    def fold(self) -> None:
        """Any form -> folded integer codes (AdaRound hardened); drops weight / alpha / w_floor."""
        if self.form == "folded":
            return
        self.soft = False
        codes = self._codes().detach().round().to(self.code_dtype())
        for name in ("weight", "alpha", "w_floor"):
            if hasattr(self, name):
                delattr(self, name)
        self.register_buffer("w_int", codes)
        self.form = "folded"

    def prepare_form(self, form: str) -> None:
        """Create empty state of ``form`` so that a saved state_dict can be loaded into it."""
        if form == self.form:
            return
        if self.form != "rtn" or form not in WEIGHT_FORMS:
            raise RuntimeError(f"cannot prepare form {form!r} from {self.form!r}")
        dev = self.scale.device
        del self.weight
        if form == "adaround":
            self.register_buffer("w_floor", torch.zeros(self.weight_shape, device=dev))
            self.alpha = nn.Parameter(torch.zeros(self.weight_shape, device=dev))
        else:
            self.register_buffer("w_int", torch.zeros(self.weight_shape, dtype=self.code_dtype(),
                                                      device=dev))
        self.form = form

    # ---- forward -----------------------------------------------------------------------
    def state_tensors(self) -> tuple[torch.Tensor, ...]:
        """Tensors the dequantized weight depends on (cache key of the layer)."""
        if self.form == "rtn":
            return (self.weight, self.scale, self.zero_point)
        if self.form == "adaround":
            return (self.w_floor, self.alpha, self.scale, self.zero_point)
        return (self.w_int, self.scale, self.zero_point)

    def forward(self) -> torch.Tensor:
        """The fake-quantized weight (STE rounding in the rtn form)."""
        if self.form == "rtn":
            q = torch.clamp(round_ste(self.weight / self.scale) + self.zero_point,
                            self.qmin, self.qmax)
        else:
            q = self._codes()
        return ((q - self.zero_point) * self.scale).to(self.scale.dtype)

    def regularizer(self, beta) -> torch.Tensor:
        return ar.rounding_regularizer(self.alpha, beta)

    def extra_repr(self) -> str:
        return (f"bits={self.bits}, mode={self.mode}, per_channel={self.per_channel}, "
                f"form={self.form}")
