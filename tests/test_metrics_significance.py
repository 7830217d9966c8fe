"""The significance rule and value formatting used by reports."""
from __future__ import annotations


from ptqbench.metrics import format_value, not_significantly_different
from ptqbench.metrics.significance import half_width


def v(value, lo=None, hi=None, **extra):
    out = {"value": value, **extra}
    if lo is not None:
        out["ci"] = [lo, hi]
    return out


def test_difference_within_combined_half_widths_is_not_significant():
    a, b = v(10.0, 9.0, 11.0), v(12.0, 11.0, 13.0)  # |diff| 2 > hypot(1, 1) = 1.41
    assert not not_significantly_different(a, b)
    c = v(11.2, 10.2, 12.2)  # |diff| 1.2 <= 1.41 (intervals overlap)
    assert not_significantly_different(a, c) and not_significantly_different(c, a)
    # overlapping intervals can still differ significantly: 1.9 > 1.41 although 11 > 10.9
    assert not not_significantly_different(a, v(11.9, 10.9, 12.9))


def test_asymmetric_intervals_use_the_facing_sides():
    a = v(10.0, 9.9, 13.0)  # wide upwards
    b = v(12.0, 11.9, 12.1)
    assert not_significantly_different(a, b)  # hypot(3.0, 0.1) >= 2
    a_low = v(10.0, 7.0, 10.1)  # wide downwards only
    assert not not_significantly_different(a_low, b)  # hypot(0.1, 0.1) < 2


def test_missing_values_and_intervals():
    assert not not_significantly_different(v(None, unavailable="x"), v(1.0, 0.0, 2.0))
    assert not not_significantly_different(v(float("nan")), v(1.0))
    assert not_significantly_different(v(1.0), v(1.0))
    assert not not_significantly_different(v(1.0), v(1.5))
    assert not_significantly_different(v(1.0), v(1.5, 0.9, 2.1))  # only b's interval: 0.6 >= 0.5


def test_format_value():
    assert format_value(v(12.3449, 11.79, 12.90)) == "12.34 ± 0.56"
    assert format_value(v(3.14159), digits=3) == "3.142"
    assert format_value(v(None, unavailable="no logits")) == "n/a (no logits)"
    assert format_value(None) == "n/a (missing)"
    assert half_width(v(1.0, 0.5, 2.0)) == 1.0
    assert format_value(v(float("nan"))) == "n/a (nan)"
