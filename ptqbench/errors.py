"""User-facing errors: the CLI prints them without a traceback."""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator


def one_line(text: str) -> str:
    """``text`` as one printable line: a key or value from a suite may hold control characters
    (TOML allows them in quoted keys and strings), which are shown escaped."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                   for c in text)


class PtqbenchError(Exception):
    """An error caused by the user's input, reported as one clear message."""


class SuiteError(PtqbenchError):
    """A problem in a suite file, located by file and key path."""

    def __init__(self, file, key: str, reason: str):
        self.file, self.key, self.reason = str(file), key, reason
        where = f"{self.file}: {key}" if key else self.file
        super().__init__(one_line(f"{where}: {reason}"))

    @property
    def problems(self) -> list["SuiteError"]:
        """Every problem this error stands for (one here; several in :class:`SuiteErrors`)."""
        return [self]


class SuiteErrors(SuiteError):
    """Several problems of one suite, reported together: one line each.

    A subclass of SuiteError whose ``file``/``key``/``reason`` are the first problem's, so code
    that handles one problem keeps working.
    """

    def __init__(self, problems: Iterable[SuiteError]):
        flat = _unique(p for exc in problems for p in exc.problems)
        if not flat:
            raise ValueError("SuiteErrors needs at least one problem")
        self._problems = flat
        first = flat[0]
        self.file, self.key, self.reason = first.file, first.key, first.reason
        lines = "\n".join(f"  {p}" for p in flat)
        Exception.__init__(self, f"{len(flat)} problems in the suite:\n{lines}")

    @property
    def problems(self) -> list[SuiteError]:
        return list(self._problems)


def _unique(problems: Iterable[SuiteError]) -> list[SuiteError]:
    out, seen = [], set()
    for p in problems:
        if str(p) not in seen:
            seen.add(str(p))
            out.append(p)
    return out


class Problems:
    """Collects the problems of a suite so that all of them are reported in one go."""

    def __init__(self):
        self.items: list[SuiteError] = []

    @classmethod
    def of(cls, items: Iterable[SuiteError]) -> "Problems":
        out = cls()
        out.items = list(items)
        return out

    def add(self, file, key: str, reason: str) -> None:
        self.items.append(SuiteError(file, key, reason))

    def extend(self, exc: SuiteError) -> None:
        self.items.extend(exc.problems)

    @contextlib.contextmanager
    def collect(self) -> Iterator[None]:
        """Run a block; a SuiteError it raises is kept instead of propagating."""
        try:
            yield
        except SuiteError as exc:
            self.extend(exc)

    def __bool__(self) -> bool:
        return bool(self.items)

    def raise_any(self) -> None:
        """Raise what was collected: nothing, the one problem, or all of them together."""
        items = _unique(self.items)
        if len(items) == 1:
            raise items[0]
        if items:
            raise SuiteErrors(items)


class UnknownPluginError(PtqbenchError):
    def __init__(self, family: str, name: str, known, where: str = ""):
        self.family, self.name = family, name
        known = ", ".join(sorted(known)) or "(none)"
        prefix = f"{where}: " if where else ""
        super().__init__(f"{prefix}unknown {family[:-1]} plugin {name!r}; known: {known}")
