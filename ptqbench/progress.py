"""Progress bars for long stages (sampling, calibration, reconstruction), on rich."""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

from rich.console import Console
from rich.markup import escape
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)


class Reporter:
    """What stages receive: ``task(description, total)`` yields an ``advance(n=1)`` callable."""

    def __init__(self, console: Optional[Console] = None, enabled: bool = True,
                 prefix: str = ""):
        self.console = console or Console(stderr=True)
        self.enabled = enabled
        self.prefix = prefix  # e.g. "[cuda:1] " for a worker process's lines
        self._progress: Optional[Progress] = None

    def __enter__(self):
        if self.enabled:
            self._progress = Progress(
                SpinnerColumn(), TextColumn("[progress.description]{task.description}"),
                BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                console=self.console, transient=True)
            self._progress.__enter__()
        return self

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.__exit__(*exc)
            self._progress = None

    @contextlib.contextmanager
    def task(self, description: str, total: Optional[int] = None) -> Iterator:
        """Yields ``advance(n=1, description=None)``; the bar disappears when the stage ends."""
        if self._progress is None:
            yield lambda n=1, description=None: None
            return
        tid = self._progress.add_task(description, total=total)

        def advance(n=1, description=None):
            self._progress.update(tid, advance=n, **({"description": description}
                                                     if description else {}))

        try:
            yield advance
        finally:
            self._progress.remove_task(tid)

    def log(self, msg: str) -> None:
        (self._progress.console if self._progress else self.console).print(
            escape(self.prefix) + msg, highlight=False)
