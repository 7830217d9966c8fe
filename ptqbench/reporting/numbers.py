"""Numbers as a reader wants them: value to 3-4 significant digits, the interval's half-width
to 2, and one notation per column (a column of tiny or huge numbers shares one power of ten,
named in its header, instead of every cell carrying its own exponent)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional


@dataclass(frozen=True)
class Cell:
    """A formatted value and the half-width of its interval ("" when there is none)."""

    value: str
    half_width: str = ""

    def inline(self) -> str:
        return f"{self.value} ± {self.half_width}" if self.half_width else self.value

    def stacked(self) -> str:
        return f"{self.value}\n±{self.half_width}" if self.half_width else self.value


def _finite(x) -> bool:
    return x is not None and isinstance(x, (int, float)) and math.isfinite(x)


def column_exponent(values: Iterable[Optional[float]]) -> int:
    """Power of ten (a multiple of 3) a column is shown in: 0 when its largest magnitude lies in
    [0.01, 10000), else the exponent that brings it to 1..999 (MSE 0.0027 -> 2.7 x 1e-3)."""
    mags = [abs(float(v)) for v in values if _finite(v) and v != 0]
    if not mags:
        return 0
    top = max(mags)
    if 1e-2 <= top < 1e4:
        return 0
    return 3 * math.floor(math.log10(top) / 3)


def _decimals(x: float, significant: int) -> int:
    return significant - 1 - math.floor(math.log10(abs(x)))


def _fixed(x: float, decimals: int) -> str:
    if decimals <= 0:
        return f"{round(x, decimals):.0f}"
    return f"{x:.{decimals}f}"


def format_half_width(h: float) -> str:
    """Two significant digits: 0.4935 -> 0.49, 0.01908 -> 0.019, 123.4 -> 120."""
    if h == 0:
        return "0"
    return _fixed(h, _decimals(h, 2))


def format_value(v: float, h: Optional[float] = None) -> str:
    """Four significant digits, but no digit finer than the interval's second significant one,
    and never fewer than three: 38.3127 ± 0.49 -> 38.31, 8.3601 ± 0.20 -> 8.36."""
    if v == 0:
        return "0"
    decimals = _decimals(v, 4)
    if h is not None and h > 0:
        decimals = max(_decimals(v, 3), min(decimals, _decimals(h, 2)))
    return _fixed(v, decimals)


def format_cell(value, lo=None, hi=None, exponent: int = 0) -> Cell:
    """One leaderboard cell: ``value`` with the 95% interval [lo, hi], in units of 10**exponent."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return Cell("n/a")
    if isinstance(value, float) and math.isinf(value):
        return Cell("inf" if value > 0 else "-inf")
    scale = 10.0 ** -exponent
    v = float(value) * scale
    h = (float(hi) - float(lo)) / 2 * scale if _finite(lo) and _finite(hi) else None
    if h is None:
        return Cell(format_value(v))
    if v == 0 and h == 0:
        return Cell("0")  # the reference row against itself
    return Cell(format_value(v, h), format_half_width(h))


def exponent_label(exponent: int) -> str:
    """How a header says the column is scaled ("" when it is not)."""
    return f"×1e{exponent}" if exponent else ""
