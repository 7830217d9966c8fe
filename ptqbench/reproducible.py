"""What "the same result" means for two records of one cell, bit for bit.

A record mixes results with facts about the run that made them. Two runs of the same cell with
the same code and numerics must agree exactly on the results and may differ in the rest.

Compared (``COMPARED_FIELDS``): the cell and its configuration (``key``, ``cell``, ``config``,
``gen_key``, ``fp_gen_key``, ``quant_key``, ``seeds``), the outcome (``status``, ``error`` type
and message, ``metrics`` with their intervals, ``metric_errors``, ``metric_identity``,
``num_samples``), what was quantized and how (``model_identity`` without its local ``path``,
``coverage``, ``calibration``) and what calibration learned (``reconstruction`` and
``weighting_state``: per-block losses, iterations, learned weights).

Not compared: wall-clock and memory (``costs``, ``costs_calibration_reused``, ``started``,
``finished``, and inside the compared fields every key named ``seconds``/``*_seconds``,
``*_per_s``, ``peak_*``, ``cache_bytes_*``), whether a block was ``resumed`` from a checkpoint,
tracebacks (they name files), and where and with what it ran (``host``, ``git``, ``versions``,
``code``, ``suite.file``, ``plugins`` sources: the baseline keeps ``code`` and ``versions`` to
say *why* results differ, but they are not results).

The samples themselves are compared through :func:`samples_sha256` (the uint8 arrays in the
results folder).
"""
from __future__ import annotations

import copy
import hashlib
import json
import re
from typing import Any, Optional

from .store import Store

COMPARED_FIELDS = ("key", "cell", "config", "gen_key", "fp_gen_key", "quant_key", "seeds",
                   "status", "error", "metrics", "metric_errors", "metric_identity",
                   "num_samples", "model_identity", "coverage", "calibration", "reconstruction",
                   "weighting_state")
#: keys dropped wherever they occur inside the compared fields: clocks, throughput, memory,
#: resume bookkeeping, tracebacks
VOLATILE_KEY = re.compile(r"^(seconds|resumed|traceback)$|_seconds$|_per_s$|^peak_|_peak_bytes$|"
                          r"_peak_rss_bytes$|^cache_bytes_")
#: (field, key) pairs that name local paths
LOCAL_PATHS = (("model_identity", "path"),)


def comparable(record: dict) -> dict:
    """The part of ``record`` that two runs of its cell must reproduce exactly."""
    out = {f: _drop_volatile(copy.deepcopy(record.get(f))) for f in COMPARED_FIELDS}
    for field, key in LOCAL_PATHS:
        if isinstance(out.get(field), dict):
            out[field].pop(key, None)
    return out


def fingerprint(record: dict) -> str:
    """SHA-256 of :func:`comparable` as canonical JSON (equal fingerprints: equal results)."""
    text = json.dumps(comparable(record), sort_keys=True, allow_nan=True, default=str,
                      separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def differences(a: dict, b: dict, limit: int = 5) -> list[str]:
    """Paths (``metrics.paired_mse.value``) where the comparable parts of two records differ."""
    out: list[str] = []
    _diff(comparable(a), comparable(b), "", out, limit)
    return out


def samples_sha256(store: Store, gen_key: Optional[str], num_samples: Optional[int]
                   ) -> Optional[str]:
    """SHA-256 of a cell's samples (uint8, index order); None when they are not in the folder."""
    if not gen_key or not num_samples:
        return None
    samples = store.load_samples(gen_key, int(num_samples))
    if samples is None:
        return None
    return hashlib.sha256(samples.tobytes()).hexdigest()


def _drop_volatile(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_volatile(v) for k, v in value.items() if not VOLATILE_KEY.search(str(k))}
    if isinstance(value, list):
        return [_drop_volatile(v) for v in value]
    return value


def _diff(a: Any, b: Any, path: str, out: list[str], limit: int) -> None:
    if len(out) >= limit:
        return
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            _diff(a.get(k), b.get(k), f"{path}.{k}" if path else str(k), out, limit)
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            _diff(x, y, f"{path}[{i}]", out, limit)
    elif a != b and not (_is_nan(a) and _is_nan(b)):
        out.append(path)


def _is_nan(x: Any) -> bool:
    return isinstance(x, float) and x != x
