"""Advisory file locks between workers (threads, processes, hosts sharing one output folder).

The rule (README, "Running on a cluster"):

* **Correctness never depends on a lock.** Every artefact (record, sample shard, checkpoint,
  cache entry) is deterministic and appears under its final name by one atomic rename of a
  complete temp file in the same folder. Two workers that do the same work write the same bytes;
  the last rename wins. Locks only keep workers from doing the same work twice.
* **A lock is the OS's, not the file's.** ``locks/*.lock`` files are created and never deleted;
  their existence means nothing. The lock is an ``flock`` on the open file, which the kernel drops
  when the holder dies (any death, ``kill -9`` included) and an NFS server drops when the holder's
  host stops renewing its lease (NFSv4: about 90 s). So a lock file left behind by a dead holder is
  free. The files are safe to delete while nothing runs.
* **Filesystems without cluster-wide flock** (flock refused, or Lustre mounted ``localflock``,
  where flock is node-local): ``PTQBENCH_LOCKS=files`` (automatic when flock is refused) uses
  heartbeat files instead: the holder creates ``NAME.held`` exclusively and rewrites it every
  ``HEARTBEAT_S`` seconds; a waiter breaks a ``.held`` file not rewritten for ``STALE_S`` seconds
  (its holder is dead, or its host is unreachable, which is the same to the others), and at once
  when the file names a process of the waiter's own host and PID namespace that no longer exists
  (a holder killed on this node: no need to wait out the heartbeat).
  The fallback is remembered by this process only: it must not leak into the environment of the
  processes it starts (they find out for themselves on their first lock).
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Iterator

HEARTBEAT_S = 10.0
STALE_S = 60.0
POLL_S = 0.5
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


# Set when flock was refused in this process (a filesystem without it): later locks go straight
# to heartbeat files. A module flag, not os.environ: the environment would carry it into every
# child process and every later test of the same interpreter.
_flock_refused = False


def lock_mode() -> str:
    mode = os.environ.get("PTQBENCH_LOCKS", "files" if _flock_refused else "flock")
    return mode if mode in ("flock", "files") else "flock"


@contextlib.contextmanager
def exclusive_lock(lock_path: Path, blocking: bool = True) -> Iterator[bool]:
    """Hold an exclusive lock on ``lock_path`` (created if missing) for the ``with`` body.

    Yields True when held. With ``blocking=False`` it yields False at once when another worker
    holds the lock (the body then runs without it and must not do the guarded work).
    Not re-entrant: a holder that asks again for the same path waits for itself."""
    global _flock_refused
    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    if lock_mode() == "files":
        with _heartbeat_lock(lock_path, blocking) as held:
            yield held
        return
    try:
        import fcntl
    except ImportError:  # non-POSIX: no waiting; atomic renames still keep artefacts whole
        yield True
        return
    with open(lock_path, "a+") as f:
        flags = fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB)
        try:
            fcntl.flock(f.fileno(), flags)
        except BlockingIOError:
            yield False
            return
        except OSError as exc:
            if exc.errno not in _NO_FLOCK:
                raise
            _flock_refused = True  # this filesystem has no flock: stop trying
            with _heartbeat_lock(lock_path, blocking) as held:
                yield held
            return
        try:
            yield True
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def is_locked(lock_path: Path) -> bool:
    """Whether some live worker holds the lock (for ``ptqbench status``; never waits, changes
    nothing). A live heartbeat file counts whatever this process's mode: the workers may have run
    with ``PTQBENCH_LOCKS=files`` while ``status`` runs without it."""
    lock_path = Path(lock_path)
    held = _held_path(lock_path)
    if held.exists() and _looks_alive(held):
        return True
    if not lock_path.exists() or lock_mode() == "files":
        return False
    with exclusive_lock(lock_path, blocking=False) as got:
        return not got


# ---- heartbeat files (filesystems without a cluster-wide flock) -----------------------------
def _held_path(lock_path: Path) -> Path:
    return lock_path.with_name(lock_path.name + ".held")


@contextlib.contextmanager
def _heartbeat_lock(lock_path: Path, blocking: bool) -> Iterator[bool]:
    held = _held_path(lock_path)
    token = uuid.uuid4().hex
    while not _try_create(held, token):
        _break_if_stale(held)
        if not blocking:
            if _try_create(held, token):
                break
            yield False
            return
        time.sleep(POLL_S)
    stop = threading.Event()
    beat = threading.Thread(target=_beat, args=(held, token, stop), daemon=True)
    beat.start()
    try:
        yield True
    finally:
        stop.set()
        beat.join()
        if _owner(held) == token:
            with contextlib.suppress(FileNotFoundError):
                held.unlink()


def _pid_namespace() -> str | None:
    """This process's PID namespace (Linux), so that a PID is only judged in its own namespace:
    two containers may share a host name and a filesystem but not their PIDs."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _try_create(held: Path, token: str) -> bool:
    try:
        fd = os.open(held, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as fh:
        json.dump({"token": token, "host": socket.gethostname(), "pid": os.getpid(),
                   "pidns": _pid_namespace()}, fh)
    return True


def _holder(held: Path) -> dict:
    try:
        info = json.loads(held.read_text())
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _owner(held: Path) -> str | None:
    return _holder(held).get("token")


def _holder_is_dead(info: dict) -> bool:
    """True only when the holder is known dead: a process of this host and PID namespace that no
    longer exists. Anything else (another host, a file being written, no /proc) is left to the
    heartbeat's staleness."""
    pid = info.get("pid")
    if (info.get("host") != socket.gethostname() or not isinstance(pid, int) or pid <= 0
            or info.get("pidns") is None or info.get("pidns") != _pid_namespace()):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # exists, owned by someone else
        return False
    return _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    """A killed holder whose parent has not reaped it yet still answers kill(pid, 0)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[:1] == ["Z"]


def _beat(held: Path, token: str, stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT_S):
        if _owner(held) != token:
            return  # broken by a waiter that thought us dead: nothing left to keep alive
        with contextlib.suppress(OSError):
            os.utime(held)


def _abandoned(held: Path, info: dict) -> bool:
    """The one rule for a heartbeat file nobody keeps: not rewritten for STALE_S seconds, or it
    names a holder known dead. A file that vanished is abandoned too."""
    try:
        age = time.time() - held.stat().st_mtime
    except FileNotFoundError:
        return True
    return age >= STALE_S or _holder_is_dead(info)


def _looks_alive(held: Path) -> bool:
    return not _abandoned(held, _holder(held))


def _break_if_stale(held: Path) -> None:
    dead = _holder(held)
    if not _abandoned(held, dead):
        return
    # rename first: of several waiters that see the same stale file, exactly one moves it away
    grave = held.with_name(f"{held.name}.stale-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(held, grave)
    except FileNotFoundError:
        return
    moved = _holder(grave)
    if not (moved.get("token") == dead.get("token") and _abandoned(grave, moved)):
        # another waiter broke the stale file and a live holder made a new one in between:
        # put it back unless yet another one exists (best effort; see the rule above)
        with contextlib.suppress(FileExistsError):
            os.link(grave, held)
    grave.unlink()
