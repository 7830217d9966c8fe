"""The CLI's last line of defence: a user never sees a raw traceback by default.

User errors (:class:`~ptqbench.errors.PtqbenchError`) print as they are. Anything else is a bug
(of ptqbench or of a plugin) or an input nobody foresaw: it prints one short line and the path
of a log file that holds the full traceback; ``ptqbench --debug`` (or ``PTQBENCH_DEBUG=1``) lets
the traceback through instead.
"""
from __future__ import annotations

import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

import click

from .errors import PtqbenchError

#: exit status of an unexpected error (sysexits' EX_SOFTWARE); user errors exit with 1
INTERNAL_ERROR_EXIT = 70
#: folder for crash logs (default: $XDG_CACHE_HOME/ptqbench/logs, else the temp folder)
LOG_DIR_ENV = "PTQBENCH_LOG_DIR"


class InternalError(click.ClickException):
    exit_code = INTERNAL_ERROR_EXIT


def log_dirs() -> list[Path]:
    """Where crash logs go, first writable wins."""
    dirs = []
    if os.environ.get(LOG_DIR_ENV):
        dirs.append(Path(os.environ[LOG_DIR_ENV]))
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    dirs += [Path(cache) / "ptqbench" / "logs", Path(tempfile.gettempdir()) / "ptqbench-logs"]
    return dirs


def write_crash_log(exc: BaseException, argv: list[str]) -> Path | None:
    """Write the traceback of ``exc`` with what is needed to reproduce it; None if no folder
    could take it."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        ptq = version("ptqbench")
    except PackageNotFoundError:
        ptq = "?"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    text = (f"command: {' '.join(argv)}\ncwd: {os.getcwd()}\ntime: {time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n"
            f"ptqbench {ptq}, python {platform.python_version()}, {platform.platform()}\n\n"
            + "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
    for folder in log_dirs():
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, path = tempfile.mkstemp(dir=folder, prefix=f"crash-{stamp}-", suffix=".log")
            with os.fdopen(fd, "w") as fh:
                fh.write(text)
            return Path(path)
        except OSError:
            continue
    return None


def one_line(exc: BaseException, limit: int = 300) -> str:
    """``Type: first line of the message``, cut to ``limit`` characters."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


class GuardedGroup(click.Group):
    """A click group whose commands cannot end in a raw traceback (unless --debug)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except PtqbenchError as exc:
            raise click.ClickException(str(exc)) from None
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise  # click's own ways out (Exit and Abort are RuntimeErrors)
        except Exception as exc:
            if ctx.params.get("debug"):
                raise
            log = write_crash_log(exc, [ctx.info_name or "ptqbench", *sys.argv[1:]])
            where = (f"the full traceback is in {log}" if log is not None
                     else "no log file could be written")
            raise InternalError(
                f"unexpected error: {one_line(exc)}\n"
                f"This is a bug in ptqbench or in a plugin; {where} "
                f"(rerun with `ptqbench --debug ...` to see it here).") from None
