"""Regression check: compare every cell's metrics of a run with a baseline (``ptqbench check``).

Cells are matched by identity (model, sampler, bits, method, seed), not by key: a key hashes the
resolved configuration, so a changed default gives new keys for the same cells, which is exactly
when a comparison is wanted (the check says "config changed").

For each metric of a baseline cell, ``worse`` is how much worse the run is (positive: worse, in
the metric's own direction) and the cell regresses when

    worse > statistical tolerance + slack,      slack = abs + rel * |baseline value|

The statistical tolerance:

* paired metrics (``paired_mse``, ``paired_psnr``) when both sides have per-sample values (the
  baseline file keeps them; the run's come from its samples): a paired bootstrap of the
  per-sample difference run - baseline (same seeds, so sample i starts from the same x_T in
  both); the tolerance is the distance from the mean difference to its 95% bound facing zero,
  i.e. the check fails when the whole 95% interval of the difference is worse than the slack.
  It sees sampling noise only: calibration randomness is the same in both only when runs are
  deterministic (same code, same machine kind), so give a slack where they are not.
* other metrics: the 95% intervals of both values, the rule of
  :func:`ptqbench.metrics.significance.not_significantly_different`: sqrt(h_b^2 + h_r^2), h being
  each interval's half-width on the side facing the other value (no interval: zero width).

A value that is missing now (``unavailable``) but was there in the baseline regresses; a cell
that failed regresses; baseline cells the run lacks are "missing" (a failure unless allowed);
cells the baseline lacks are "new" (reported). Significant improvements are reported too, as
a hint to update the baseline.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from .baseline import CellResult, Ident, Snapshot
from .errors import PtqbenchError

#: metrics computed per sample against the FP samples -> per-sample values from per-sample MSE
PAIRED = {
    "paired_mse": lambda mse, values: mse,
    "paired_psnr": lambda mse, values: _psnr(mse, values),
}
BOOTSTRAP_RESAMPLES = 2000


@dataclass(frozen=True)
class Slack:
    """Allowed worsening beyond the statistical tolerance: ``abs + rel * |baseline|``."""
    abs: float = 0.0
    rel: float = 0.0

    def amount(self, baseline: float) -> float:
        return self.abs + self.rel * abs(baseline)

    def __add__(self, other: "Slack") -> "Slack":
        return Slack(self.abs + other.abs, self.rel + other.rel)

    def describe(self) -> str:
        parts = ([f"{self.abs:g}"] if self.abs else []) + ([f"{100 * self.rel:g}%"] if self.rel
                                                          else [])
        return " + ".join(parts) or "0"


def parse_slack(items, where: str = "--slack") -> dict[str, Slack]:
    """``METRIC=VALUE`` items (``VALUE`` absolute, or relative with a trailing %; ``*`` for every
    metric; the same metric twice adds up, e.g. ``paired_mse=1e-4 paired_mse=5%``)."""
    out: dict[str, Slack] = {}
    for item in items:
        metric, sep, value = str(item).partition("=")
        metric, value = metric.strip(), value.strip()
        if not sep or not metric or not value:
            raise PtqbenchError(f"{where} {item!r}: expected METRIC=VALUE, e.g. paired_mse=0.001 "
                                f"or paired_mse=5%")
        rel = value.endswith("%")
        try:
            x = float(value[:-1] if rel else value)
        except ValueError:
            raise PtqbenchError(f"{where} {item!r}: {value!r} is not a number") from None
        if not math.isfinite(x) or x < 0:
            raise PtqbenchError(f"{where} {item!r}: the slack must be a finite number >= 0")
        out[metric] = out.get(metric, Slack()) + (Slack(rel=x / 100) if rel else Slack(abs=x))
    return out


def slack_from_baseline(table: dict, where: str) -> dict[str, Slack]:
    """The baseline file's ``slack`` table: metric -> {"abs": x, "rel": y} (rel as a fraction)."""
    out = {}
    for metric, spec in table.items():
        if not isinstance(spec, dict) or set(spec) - {"abs", "rel"}:
            raise PtqbenchError(f"{where}: slack.{metric}: expected {{\"abs\": x, \"rel\": y}} "
                                f"(rel as a fraction: 0.05 = 5%)")
        try:
            s = Slack(abs=float(spec.get("abs", 0.0)), rel=float(spec.get("rel", 0.0)))
        except (TypeError, ValueError):
            raise PtqbenchError(f"{where}: slack.{metric}: abs and rel must be numbers") from None
        if min(s.abs, s.rel) < 0 or not (math.isfinite(s.abs) and math.isfinite(s.rel)):
            raise PtqbenchError(f"{where}: slack.{metric}: abs and rel must be finite and >= 0")
        out[metric] = s
    return out


@dataclass
class MetricCheck:
    ident: Ident
    metric: str
    baseline: Optional[float]
    current: Optional[float]
    #: how much worse the run is, in the metric's direction (negative: better)
    worse: Optional[float]
    #: statistical tolerance + slack (None when the metric could not be compared)
    tolerance: Optional[float]
    test: str  # "paired", "95% CI", "-"
    verdict: str  # "ok", "regressed", "improved", "missing"
    note: str = ""


@dataclass
class CellNote:
    ident: Ident
    what: str  # "failed", "new", "missing", "config changed", "not reproduced", ...
    detail: str = ""
    failure: bool = False


@dataclass
class CheckResult:
    metrics: list[MetricCheck] = field(default_factory=list)
    notes: list[CellNote] = field(default_factory=list)
    #: cells whose compared record fields (and samples, where both have them) equal the baseline's
    identical: list[Ident] = field(default_factory=list)
    compared_cells: int = 0
    code_changed: bool = False
    #: how this run's numerics differ from the baseline's (device, platform, threads, torch)
    numerics_changed: list[str] = field(default_factory=list)

    @property
    def regressions(self) -> list[MetricCheck]:
        return [m for m in self.metrics if m.verdict in ("regressed", "missing")]

    @property
    def failures(self) -> list[CellNote]:
        return [n for n in self.notes if n.failure]

    @property
    def passed(self) -> bool:
        return not self.regressions and not self.failures


def compare(baseline: Snapshot, current: Snapshot, slack: Optional[dict[str, Slack]] = None,
            allow_missing: bool = False, exact: bool = False) -> CheckResult:
    """Compare ``current`` with ``baseline`` (see the module doc). ``exact``: a cell whose
    compared record fields or samples differ from the baseline fails (deterministic runs)."""
    slack = slack or {}
    out = CheckResult(code_changed=bool(baseline.code) and bool(current.code)
                      and baseline.code != current.code,
                      numerics_changed=numerics_changes(baseline, current))
    # same code, same numerics: a cell that is not bit-identical is worth a word even unasked
    expect_exact = exact or not (out.code_changed or out.numerics_changed)
    for ident in sorted(set(baseline.cells) | set(current.cells), key=_order):
        base, cur = baseline.cells.get(ident), current.cells.get(ident)
        if cur is None:
            out.notes.append(CellNote(ident, "missing", "in the baseline, not in this run",
                                      failure=not allow_missing))
            continue
        if base is None:
            out.notes.append(CellNote(ident, "new", f"not in the baseline (key {cur.key})"))
            continue
        out.compared_cells += 1
        if cur.status != "ok":
            out.notes.append(CellNote(ident, "failed", cur.error or cur.status, failure=True))
            continue
        if base.key != cur.key:
            out.notes.append(CellNote(ident, "config changed",
                                      f"key {base.key} -> {cur.key}: the resolved configuration "
                                      f"differs (e.g. a changed default)"))
        if _identical(base, cur):
            out.identical.append(ident)
        elif exact or (expect_exact and base.key == cur.key):
            out.notes.append(CellNote(ident, "not reproduced", _what_differs(base, cur),
                                      failure=exact))
        for metric in base.metrics:
            if _value(base.metrics[metric]) is None and _value(cur.metrics.get(metric)) is None:
                continue  # e.g. the FP cell's PSNR against itself: nothing to compare
            out.metrics.append(compare_metric(ident, metric, base, cur,
                                              slack.get(metric, slack.get("*", Slack()))))
        for metric in sorted(set(cur.metrics) - set(base.metrics)):
            out.notes.append(CellNote(ident, "new metric", metric))
    return out


def numerics_changes(baseline: Snapshot, current: Snapshot) -> list[str]:
    """What differs between the two runs' numerics (each only where both sides recorded it)."""
    out = []
    pairs = [(k, baseline.numerics.get(k), current.numerics.get(k))
             for k in ("device", "platform", "torch_threads")]
    pairs += [(k, baseline.versions.get(k), current.versions.get(k)) for k in ("torch",)]
    for k, b, c in pairs:
        if b is not None and c is not None and b != c:
            out.append(f"{k} {b} -> {c}")
    return out


def compare_metric(ident: Ident, metric: str, base: CellResult, cur: CellResult,
                   slack: Slack) -> MetricCheck:
    b, c = base.metrics[metric], cur.metrics.get(metric) or {}
    bv, cv = _value(b), _value(c)
    if bv is None:
        return MetricCheck(ident, metric, None, cv, None, None, "-", "ok",
                           "no value in the baseline: update it")
    if cv is None:
        why = c.get("unavailable") or ("not computed" if not c else "no value")
        return MetricCheck(ident, metric, bv, None, None, None, "-", "missing", why)
    higher = b.get("higher_is_better", c.get("higher_is_better"))
    if higher is None:
        return MetricCheck(ident, metric, bv, cv, None, None, "-", "ok",
                           "direction unknown: not compared")
    sign = -1.0 if higher else 1.0
    worse = sign * (cv - bv)
    paired = _paired_tolerance(metric, base, cur, sign)
    if paired is not None:
        worse, stat, test = paired[0], paired[1], "paired"
    else:
        stat, test = _interval_tolerance(b, c, bv, cv, higher), "95% CI"
    tolerance = stat + slack.amount(bv)
    if worse > tolerance:
        verdict = "regressed"
    elif -worse > stat:
        verdict = "improved"
    else:
        verdict = "ok"
    note = f"slack {slack.describe()}" if slack != Slack() else ""
    return MetricCheck(ident, metric, bv, cv, worse, tolerance, test, verdict, note)


def _paired_tolerance(metric: str, base: CellResult, cur: CellResult, sign: float
                      ) -> Optional[tuple[float, float]]:
    """(mean worsening, distance to its 95% bound facing zero) from the per-sample values."""
    from .metrics.paired import paired_difference

    per = PAIRED.get(metric)
    if (per is None or base.per_sample_mse is None or cur.per_sample_mse is None
            or len(base.per_sample_mse) != len(cur.per_sample_mse)
            or base.values_per_sample != cur.values_per_sample):
        return None
    a = per(np.asarray(cur.per_sample_mse), cur.values_per_sample)
    b = per(np.asarray(base.per_sample_mse), base.values_per_sample)
    mean, lo, hi = paired_difference(sign * a, sign * b, resamples=BOOTSTRAP_RESAMPLES)
    return mean, (mean - lo if mean >= 0 else hi - mean)


def _interval_tolerance(b: dict, c: dict, bv: float, cv: float, higher: bool) -> float:
    # each interval's half-width on the side facing the other value
    def facing(v: dict, x: float, toward_higher: bool) -> float:
        ci = v.get("ci")
        if not ci or ci[0] is None or ci[1] is None:
            return 0.0
        return max(0.0, float(ci[1]) - x) if toward_higher else max(0.0, x - float(ci[0]))

    return math.hypot(facing(b, bv, cv > bv), facing(c, cv, bv > cv))


def _identical(base: CellResult, cur: CellResult) -> bool:
    if base.fingerprint != cur.fingerprint:
        return False
    return base.samples_sha256 is None or cur.samples_sha256 is None or \
        base.samples_sha256 == cur.samples_sha256


def _what_differs(base: CellResult, cur: CellResult) -> str:
    changed = [m for m in sorted(set(base.metrics) | set(cur.metrics))
               if base.metrics.get(m) != cur.metrics.get(m)]
    parts = []
    if changed:
        parts.append("metrics " + ", ".join(changed))
    if base.samples_sha256 and cur.samples_sha256 and base.samples_sha256 != cur.samples_sha256:
        parts.append("samples")
    return "differ: " + (", ".join(parts) or "other result fields (ptqbench.reproducible)")


def _value(v: dict) -> Optional[float]:
    x = v.get("value") if v else None
    if x is None:
        return None
    x = float(x)
    return None if math.isnan(x) else x


def _psnr(mse: np.ndarray, values: int) -> np.ndarray:
    import torch

    from .metrics.paired import psnr_from_mse

    return psnr_from_mse(torch.from_numpy(np.asarray(mse, dtype=np.float64)), values).numpy()


def _order(ident: Ident) -> tuple:
    model, sampler, bits, method, seed = ident
    return (str(model), str(sampler), method != "fp", str(bits), str(method), str(seed))
