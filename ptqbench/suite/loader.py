"""Reading suites: TOML -> includes merged -> typed Suite -> plugin names checked."""
from __future__ import annotations

import dataclasses
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..errors import Problems, PtqbenchError, SuiteError
from ..methods import PRESETS
from .schema import Suite
from .typed import convert

DEFAULT_SUITE = "tiny.toml"


def default_suite_path() -> Path:
    """The embedded default suite (installed with the package as ptqbench_suites)."""
    import ptqbench_suites

    return Path(ptqbench_suites.__file__).resolve().parent / DEFAULT_SUITE


@dataclass
class LoadedSuite:
    suite: Suite
    file: Path
    #: folder of each declared model's suite file: relative model paths resolve there
    model_dirs: dict[str, Path]
    plugin_files: list[Path]
    #: problems found by load_suite(defer=True), not raised yet
    problems: list[SuiteError] = field(default_factory=list)
    #: top-level tables that could not be read (left at their defaults; see relevant())
    broken: set[str] = field(default_factory=set)

    def relevant(self, problems: list[SuiteError]) -> list[SuiteError]:
        """``problems`` less those that may only be consequences of unreadable tables."""
        return [p for p in problems if not _depends(p.key, self.broken)]


def _read_toml(file: Path) -> dict:
    try:
        data = file.read_bytes()
    except FileNotFoundError:
        raise SuiteError(file, "", "file not found") from None
    except IsADirectoryError:
        raise SuiteError(file, "", "is a folder, not a suite file") from None
    except OSError as exc:
        raise SuiteError(file, "", f"cannot read: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SuiteError(file, "", f"not UTF-8 text (byte {exc.start}: "
                                   f"{data[exc.start:exc.start + 1]!r}); a suite is a TOML file") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SuiteError(file, "", f"not valid TOML: {exc}") from None


def _merge(base: dict, over: dict) -> dict:
    """Tables merge recursively; any other value (lists included) is replaced."""
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _raw_with_includes(file: Path, seen: tuple[Path, ...], model_dirs: dict[str, Path],
                       plugin_files: list[Path]) -> dict:
    """The merged TOML of ``file`` and its includes; raises every problem of the include tree
    (unreadable or missing files, cycles, a malformed ``include``) together. Tolerates any
    shape: the typed reader reports wrong shapes with their key paths afterwards."""
    file = file.resolve()
    if file in seen:
        chain = " -> ".join(str(p) for p in (*seen, file))
        raise SuiteError(seen[-1], "suite.include", f"include cycle: {chain}")
    raw = _read_toml(file)
    info = raw.get("suite") if isinstance(raw.get("suite"), dict) else {}
    includes = info.get("include", [])
    problems = Problems()
    if not isinstance(includes, list):
        problems.add(file, "suite.include", "expected a list of file paths, got "
                                            f"{type(includes).__name__}")
        includes = []
    merged: dict = {}
    for i, inc in enumerate(includes):
        if not isinstance(inc, str):
            problems.add(file, f"suite.include[{i}]", f"expected a file path, got {inc!r}")
            continue
        target = file.parent / inc
        if not path_exists(target):
            problems.add(file, f"suite.include[{i}]", f"included file not found: {target}")
            continue
        with problems.collect():
            merged = _merge(merged, _raw_with_includes(target, (*seen, file), model_dirs,
                                                       plugin_files))
    problems.raise_any()
    models = raw.get("models")
    for name in (models if isinstance(models, dict) else {}):
        model_dirs[name] = file.parent
    plugins = info.get("plugins", [])
    if isinstance(plugins, list):
        plugin_files.extend(_resolved(file.parent / p) for p in plugins if isinstance(p, str))
    merged = _merge(merged, raw)
    if isinstance(merged.get("suite"), dict):
        merged["suite"] = {k: v for k, v in merged["suite"].items() if k not in ("include",)}
    return merged


def load_suite(path: Optional[str | Path] = None, defer: bool = False) -> LoadedSuite:
    """Parse and validate a suite file (the embedded default when ``path`` is None).

    Problems of the file itself (encoding, TOML syntax, includes), then of its shapes and types,
    are raised at once, all of each kind together. Problems of names and files (unknown
    methods, missing model folders or plugin files) are raised too, unless ``defer``: then they
    are kept in ``LoadedSuite.problems`` for :func:`ptqbench.suite.preflight.preflight` to report
    together with its own checks.
    """
    file = (Path(path) if path is not None else default_suite_path()).absolute()
    model_dirs: dict[str, Path] = {}
    plugin_files: list[Path] = []
    raw = _raw_with_includes(file, (), model_dirs, plugin_files)
    if not raw:
        raise SuiteError(file, "", "empty suite: it declares nothing (no [grid], no [models]); "
                                   "see suites/tiny.toml for an example")
    problems = Problems()
    suite, broken = _typed_suite(raw, file, problems)
    # plugin lists of included suites add up (the merge would keep only the last list)
    plugin_files = list(dict.fromkeys(plugin_files))
    suite.suite.plugins = [str(p) for p in plugin_files]
    loaded = LoadedSuite(suite, file.resolve(), model_dirs, plugin_files, broken=broken)
    problems.items += loaded.relevant(_name_problems(loaded))
    loaded.problems = problems.items
    if not defer:
        problems.raise_any()
    return loaded


def _typed_suite(raw: dict, file: Path, problems: Problems) -> tuple[Suite, set[str]]:
    """The typed Suite, and the top-level tables that could not be read: their problems go to
    ``problems``, and they are left at their defaults so that the other tables are still
    checked (problems that may only be consequences of them are left out, see _depends)."""
    broken: set[str] = set()
    if "grid" not in raw:
        problems.add(file, "grid", "missing: without a [grid] table the suite has no cells")
        broken.add("grid")
    hints = typing.get_type_hints(Suite)
    names = [f.name for f in dataclasses.fields(Suite)]
    for key in sorted(set(raw) - set(names)):
        problems.add(file, key, f"unknown key; allowed here: {', '.join(sorted(names))}")
    kwargs = {}
    for name in names:
        if name in raw:
            try:
                kwargs[name] = convert(raw[name], hints[name], name, file)
            except SuiteError as exc:
                problems.extend(exc)
                broken.add(name)
    suite = Suite(**kwargs)
    try:
        suite.check("", file)  # references between tables (grid -> models, samplers)
    except SuiteError as exc:
        problems.items += [p for p in exc.problems if not _depends(p.key, broken)]
    return suite, broken


def _table_of(key: str) -> str:
    return key.split(".", 1)[0].split("[", 1)[0]


def _depends(key: str, broken: set[str]) -> bool:
    """Whether a problem at ``key`` may only be a consequence of the ``broken`` tables."""
    table = _table_of(key)
    if table in broken:
        return True
    # grid.models[0] 'x' not declared: [models] could not be read
    return table == "grid" and any(key == f"grid.{t}" or key.startswith((f"grid.{t}[", f"grid.{t}."))
                                   for t in broken)


def _name_problems(loaded: LoadedSuite) -> list[SuiteError]:
    """Methods, presets, model folders and plugin files that do not exist."""
    suite, file = loaded.suite, loaded.file
    problems = Problems()
    for i, p in enumerate(loaded.plugin_files):
        if not path_is_file(p):
            problems.add(file, f"suite.plugins[{i}]", f"plugin file not found: {p}")
    for i, name in enumerate(suite.grid.methods):
        if name not in suite.methods and name not in PRESETS:
            known = sorted(set(PRESETS) | set(suite.methods))
            problems.add(file, f"grid.methods[{i}]",
                         f"unknown method {name!r}; presets and declared methods: {', '.join(known)}")
    for name, entry in suite.methods.items():
        if entry.preset is not None and entry.preset not in PRESETS:
            problems.add(file, f"methods.{name}.preset",
                         f"unknown preset {entry.preset!r}; presets: {', '.join(sorted(PRESETS))}")
        if entry.preset is None and name not in PRESETS:
            problems.add(file, f"methods.{name}.preset",
                         "required: the preset this method starts from")
    for name, entry in suite.models.items():
        if entry.download:  # with a download hint, --dry-run reports a missing folder
            continue
        with problems.collect():
            _check_model_path(file, name, entry.path, loaded.model_dirs.get(name, file.parent))
    return problems.items


def _check_model_path(file: Path, name: str, path: str, base: Path) -> None:
    key = f"models.{name}.path"
    if path.startswith("builtin:"):
        folder = Path(__file__).resolve().parents[1] / "assets" / path.split(":", 1)[1]
        if not path_exists(folder) or not path.split(":", 1)[1]:
            raise SuiteError(file, key, f"no built-in model {path!r} (looked in {folder})")
        return
    if not path.strip() or "\0" in path:
        raise SuiteError(file, key, f"not a model folder or hub id: {path!r}")
    try:
        p = Path(path).expanduser()
    except RuntimeError as exc:  # ~user that does not exist
        raise SuiteError(file, key, f"cannot expand {path!r}: {exc}") from None
    p = p if p.is_absolute() else base / p
    looks_local = path.startswith((".", "/", "~")) or path.count("/") != 1
    if looks_local and not path_exists(p):
        raise SuiteError(file, key, f"model folder not found: {p.resolve()}")


def path_is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


def _resolved(path: Path) -> Path:
    try:
        return path.resolve()
    except (OSError, ValueError):  # a name the OS rejects: reported as not found later
        return path


def path_exists(path: Path) -> bool:
    """Path.exists() that says False instead of raising for names the OS rejects (too long,
    embedded NUL)."""
    try:
        return path.exists()
    except (OSError, ValueError):
        return False


def check_plugins(loaded: LoadedSuite, registry) -> None:
    """Every plugin a suite names must be registered and accept its options (the plugin part of
    :func:`ptqbench.suite.preflight.preflight`, which also checks files and output folders)."""
    from .preflight import plugin_problems

    Problems.of(plugin_problems(loaded, registry)).raise_any()


def check_options(loaded: LoadedSuite, registry) -> None:
    """Kept for callers of the old API: check_plugins checks options too."""
    check_plugins(loaded, registry)


__all__ = ["load_suite", "check_plugins", "LoadedSuite", "default_suite_path", "PtqbenchError"]
