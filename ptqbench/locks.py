"""Advisory file locks: workers (threads or processes, on one host or a shared filesystem that
supports flock) that would produce the same artefact wait for each other instead of doing the
work twice. The OS drops a lock when its holder dies, so a killed run never leaves one behind."""
from __future__ import annotations

import contextlib
from pathlib import Path


@contextlib.contextmanager
def exclusive_lock(lock_path: Path):
    """Hold an exclusive lock on ``lock_path`` (created if missing) for the ``with`` body.

    Not re-entrant: a holder that asks again for the same path waits for itself."""
    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as f:
        try:
            import fcntl
        except ImportError:  # non-POSIX: no waiting; atomic renames still keep artefacts whole
            yield
            return
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
