"""What two runs of the same cell must agree on, and where they differ.

A record holds results (metrics, learned state, losses, the resolved config) and facts about the
run that legitimately differ from one run to the next (wall-clock times, speeds, memory peaks,
dates, host). :func:`comparable` keeps the first kind, so that deterministic runs can be checked
bit for bit (``benchmarks/determinism.py``, the tests) and :func:`differences` says where two
records part.
"""
from __future__ import annotations

from typing import Any, Iterator

#: keys whose values are measurements of the run itself, never results
VOLATILE_KEYS = frozenset({
    "seconds", "total_seconds", "started", "finished", "costs", "costs_calibration_reused",
    "iters_per_s", "steady_iters_per_s", "host", "peak_rss_mb", "peak_gpu_mb",
    "device_peak_bytes", "host_peak_rss_bytes", "meta_seconds", "traceback", "torch_threads",
    "img_steps_per_s", "peak_host_mb", "peak_mb", "rss_mb",
})


def comparable(obj: Any) -> Any:
    """``obj`` without volatile keys at any depth (a copy)."""
    if isinstance(obj, dict):
        return {k: comparable(v) for k, v in obj.items() if k not in VOLATILE_KEYS}
    if isinstance(obj, list):
        return [comparable(v) for v in obj]
    return obj


def differences(a: Any, b: Any, path: str = "") -> Iterator[str]:
    """Paths at which two (comparable) records differ, with both values."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            p = f"{path}.{k}" if path else str(k)
            if k not in a or k not in b:
                yield f"{p}: only in {'second' if k not in a else 'first'}"
            else:
                yield from differences(a[k], b[k], p)
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            yield from differences(x, y, f"{path}[{i}]")
    elif a != b and not (a != a and b != b):  # NaN == NaN here: both runs gave NaN
        yield f"{path}: {a!r} != {b!r}"
