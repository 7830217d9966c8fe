"""Bit-width labels such as ``W4A8``: weight and activation bits; 16 and 32 mean full precision."""
from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import PtqbenchError

FULL_PRECISION = (16, 32)
MIN_BITS, MAX_BITS = 2, 8
_LABEL = re.compile(r"^W(\d+)A(\d+)$")


@dataclass(frozen=True)
class BitWidths:
    weight: int
    activation: int

    @property
    def label(self) -> str:
        return f"W{self.weight}A{self.activation}"

    @property
    def weight_quantized(self) -> bool:
        return self.weight not in FULL_PRECISION

    @property
    def activation_quantized(self) -> bool:
        return self.activation not in FULL_PRECISION


def check_bits(value: int, what: str) -> int:
    if value in FULL_PRECISION or MIN_BITS <= value <= MAX_BITS:
        return value
    raise PtqbenchError(f"{what} bits must be {MIN_BITS}..{MAX_BITS} or 16/32 (full precision), "
                        f"got {value}")


def parse_bits(label: str) -> BitWidths:
    """``"W4A8"`` -> BitWidths(4, 8); raises PtqbenchError with the reason otherwise."""
    m = _LABEL.match(str(label).strip().upper())
    if not m:
        raise PtqbenchError(f"bit-width {label!r} is not of the form W<bits>A<bits>, e.g. W4A8")
    w, a = int(m.group(1)), int(m.group(2))
    return BitWidths(check_bits(w, "weight"), check_bits(a, "activation"))
