"""Comparing and printing metric values that carry 95% confidence intervals.

A value dict is what a metric plugin returns per metric: ``value`` (float or None), optionally
``ci`` = [low, high] (95%), and ``unavailable`` (the reason) when ``value`` is None.

Rule used by ``not_significantly_different`` (documented here because reports depend on it):
treat each estimate as approximately normal and independent, with the standard error on the side
facing the other value taken from its interval (half-width / 1.96, so asymmetric intervals work).
The difference is significant at about the 5% level when |a - b| > sqrt(h_a^2 + h_b^2), h being
those facing half-widths: this is the 95% interval of the difference excluding zero. It is less
conservative than "the two intervals overlap" (which corresponds to |a - b| <= h_a + h_b and to
a test at roughly the 0.5% level), and reduces to it when one interval has zero width.
A missing interval counts as zero width (exact value); two values without intervals differ
unless equal. A missing value (None) is never "not significantly different".

Cells of one suite share sampling seeds, so their estimates are positively correlated and the
independence assumption makes this rule conservative for them (it says "not significant" more
often than a paired test would).
"""
from __future__ import annotations

import math
from typing import Optional


def _value(v: Optional[dict]) -> Optional[float]:
    if not v:
        return None
    x = v.get("value")
    if x is None:
        return None
    x = float(x)
    return None if math.isnan(x) else x


def _facing_half_width(v: dict, toward_higher: bool) -> float:
    ci = v.get("ci")
    if not ci or ci[0] is None or ci[1] is None:
        return 0.0
    x = float(v["value"])
    return max(0.0, float(ci[1]) - x) if toward_higher else max(0.0, x - float(ci[0]))


def not_significantly_different(a: dict, b: dict) -> bool:
    """True when the values of ``a`` and ``b`` are within sqrt(h_a^2 + h_b^2) of each other,
    h being each 95% interval's half-width on the side facing the other value (see module doc)."""
    xa, xb = _value(a), _value(b)
    if xa is None or xb is None:
        return False
    if xa == xb:
        return True
    if xa > xb:
        a, b, xa, xb = b, a, xb, xa  # now xa < xb
    ha = _facing_half_width(a, toward_higher=True)
    hb = _facing_half_width(b, toward_higher=False)
    return (xb - xa) <= math.hypot(ha, hb)


def half_width(v: dict) -> Optional[float]:
    """The larger side of a value's 95% interval (None without an interval)."""
    x = _value(v)
    ci = v.get("ci") if v else None
    if x is None or not ci or ci[0] is None or ci[1] is None:
        return None
    return max(float(ci[1]) - x, x - float(ci[0]))


def format_value(v: Optional[dict], digits: int = 2) -> str:
    """"12.34 ± 0.56" (value ± larger CI half-width), "12.34" without a CI, or "n/a (reason)"."""
    x = _value(v)
    if x is None:
        reason = (v or {}).get("unavailable") or (
            "nan" if v and v.get("value") is not None else "missing")
        return f"n/a ({reason})"
    h = half_width(v)
    text = f"{x:.{digits}f}"
    return text if h is None else f"{text} ± {h:.{digits}f}"


# Two-sided 95% quantiles of Student's t, degrees of freedom 1..30 (no scipy dependency).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_quantile_975(df: int) -> float:
    """t_{0.975, df}: the multiplier of a 95% interval of a mean of df + 1 values."""
    if df < 1:
        raise ValueError("a t interval needs at least two values")
    return _T975[df - 1] if df <= len(_T975) else 1.96


def seed_interval(values: list[float], per_seed_half_width: float = 0.0) -> tuple[float, float]:
    """95% interval of the mean of one quantity measured under several seeds.

    Each seed's value already carries its own sampling noise, so the spread across seeds covers
    calibration and sampling randomness together: mean +- t * sd / sqrt(n). With few seeds the
    sd is itself uncertain, and two seeds can agree by chance, so the interval is never made
    narrower than ``per_seed_half_width`` (the mean of the per-seed intervals' half-widths).
    """
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in values) / (n - 1))
    h = max(t_quantile_975(n - 1) * sd / math.sqrt(n), per_seed_half_width)
    return mean - h, mean + h
