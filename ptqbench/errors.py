"""User-facing errors: the CLI prints them without a traceback."""


class PtqbenchError(Exception):
    """An error caused by the user's input, reported as one clear message."""


class SuiteError(PtqbenchError):
    """A problem in a suite file, located by file and key path."""

    def __init__(self, file, key: str, reason: str):
        self.file, self.key, self.reason = str(file), key, reason
        where = f"{self.file}: {key}" if key else self.file
        super().__init__(f"{where}: {reason}")


class UnknownPluginError(PtqbenchError):
    def __init__(self, family: str, name: str, known, where: str = ""):
        self.family, self.name = family, name
        known = ", ".join(sorted(known)) or "(none)"
        prefix = f"{where}: " if where else ""
        super().__init__(f"{prefix}unknown {family[:-1]} plugin {name!r}; known: {known}")
