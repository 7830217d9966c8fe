"""Host memory: per-stage peak resident memory, and what is available for spilling.

Linux keeps a process's peak RSS (VmHWM) and lets the process reset it (``echo 5 >
/proc/self/clear_refs``), so a stage's own peak is measurable without a sampling thread.
Elsewhere the lifetime peak (getrusage) is all there is, and a stage's peak is an upper bound.
"""
from __future__ import annotations

import resource
from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
_MEMINFO = Path("/proc/meminfo")


def _status_kb(field: str):
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_host_peak() -> bool:
    """Start a new peak-RSS window; False where the OS does not support it."""
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def host_peak_mb() -> float:
    """Peak resident memory since the last reset (MiB); lifetime peak where unsupported."""
    kb = _status_kb("VmHWM")
    if kb is None:
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kb / 1024


def host_available_bytes() -> int:
    """MemAvailable of the host (bytes); 0 when unknown."""
    try:
        for line in _MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
