"""A non-editable install ships every package: pyproject.toml lists packages by hand (plugins/
and suites/ are renamed on install), and a folder left out of the list breaks only installed
copies (ptqbench.reporting was missing: `ptqbench run` crashed after its last cell on the GPU)."""
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_listed_in_pyproject():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = set()
    for name, folder in config["package-dir"].items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join((name, *rel.parts)))
    missing = sorted(found - listed)
    assert not missing, f"packages missing from pyproject.toml: {missing}"
