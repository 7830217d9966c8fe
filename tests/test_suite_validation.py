"""Malformed suites fail before any work with the file, the key path and the reason."""
import textwrap
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from ptqbench.cli import cli
from ptqbench.errors import SuiteError
from ptqbench.pipeline.runner import prepare
from ptqbench.suite.loader import load_suite

GOOD = """
[suite]
name = "t"
output = "out"

[models.m]
path = "builtin:tiny-mnist"

[samplers.s]
steps = 5

[grid]
models = ["m"]
samplers = ["s"]
bits = ["W8A8"]
methods = ["fp", "rtn"]

[evaluation]
num_samples = 8
batch_size = 4
"""


def write(tmp_path: Path, text: str, name="suite.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_good_suite_loads(tmp_path):
    loaded = load_suite(write(tmp_path, GOOD))
    assert loaded.suite.grid.bits == ["W8A8"]
    assert loaded.suite.samplers["s"].steps == 5


@pytest.mark.parametrize("old,new,key,reason", [
    ('steps = 5', 'steps = 5\nstepz = 3', "samplers.s.stepz", "unknown key"),
    ('steps = 5', 'steps = "five"', "samplers.s.steps", "expected an integer"),
    ('bits = ["W8A8"]', 'bits = ["W8A8", "W3A99"]', "grid.bits[1]", "activation bits must be"),
    ('bits = ["W8A8"]', 'bits = ["8bit"]', "grid.bits[0]", "not of the form"),
    ('methods = ["fp", "rtn"]', 'methods = []', "grid.methods", "empty"),
    ('path = "builtin:tiny-mnist"', 'path = "./no/such/model"', "models.m.path", "not found"),
    ('methods = ["fp", "rtn"]', 'methods = ["fp", "nosuch"]', "grid.methods[1]", "unknown method"),
    ('models = ["m"]', 'models = ["other"]', "grid.models[0]", "not declared"),
    ('num_samples = 8', 'num_samples = 0', "evaluation.num_samples", "must be >= 1"),
])
def test_malformed_suites(tmp_path, old, new, key, reason):
    assert old in GOOD
    path = write(tmp_path, GOOD.replace(old, new))
    with pytest.raises(SuiteError) as info:
        load_suite(path)
    assert info.value.key == key
    assert reason in info.value.reason
    assert str(path) in str(info.value)


def test_invalid_toml_names_the_file(tmp_path):
    path = write(tmp_path, GOOD + "\n[grid\n")
    with pytest.raises(SuiteError, match="not valid TOML"):
        load_suite(path)


def test_unknown_plugin_lists_known_names(tmp_path):
    text = GOOD + '\n[methods.x]\npreset = "rtn"\nweighting = "nosuch"\n'
    text = text.replace('methods = ["fp", "rtn"]', 'methods = ["fp", "x"]')
    with pytest.raises(SuiteError) as info:
        prepare(write(tmp_path, text))
    assert info.value.key == "methods.x.weighting"
    assert "unknown weighting plugin 'nosuch'" in info.value.reason
    assert "uniform" in info.value.reason  # the known names are listed


def test_cli_reports_user_errors_without_traceback(tmp_path):
    path = write(tmp_path, GOOD.replace('bits = ["W8A8"]', 'bits = ["W3A99"]'))
    result = CliRunner().invoke(cli, ["run", str(path), "--dry-run"])
    assert result.exit_code != 0
    assert "grid.bits[0]" in result.output and str(path) in result.output
    assert "Traceback" not in result.output


def test_include_extends_and_overrides(tmp_path):
    write(tmp_path, GOOD, "base.toml")
    child = write(tmp_path, """
        [suite]
        name = "child"
        include = ["base.toml"]

        [grid]
        bits = ["W4A8", "W8A8"]
        methods = ["rtn"]
        """, "child.toml")
    loaded = load_suite(child)
    assert loaded.suite.suite.name == "child"
    assert loaded.suite.grid.bits == ["W4A8", "W8A8"]  # lists are replaced
    assert loaded.suite.grid.models == ["m"]  # the rest comes from the base
    assert loaded.suite.samplers["s"].steps == 5


def test_include_cycle_is_an_error(tmp_path):
    write(tmp_path, '[suite]\ninclude = ["b.toml"]\n', "a.toml")
    write(tmp_path, '[suite]\ninclude = ["a.toml"]\n', "b.toml")
    with pytest.raises(SuiteError, match="include cycle"):
        load_suite(tmp_path / "a.toml")


def test_dry_run_prints_expanded_cells(tmp_path):
    path = write(tmp_path, GOOD.replace('bits = ["W8A8"]', 'bits = ["W8A8", "W4A8"]'))
    result = CliRunner().invoke(cli, ["run", str(path), "--dry-run", "-o", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    assert "3 cells" in result.output  # fp once, rtn at two bit-widths
    assert "W4A8 | rtn" in result.output and "FP | fp" in result.output


@pytest.mark.parametrize("table,key,reason", [
    ('reconstructor_options = { iterz = 3 }', "methods.x.reconstructor_options", "iterz"),
    ('recipe = { weight_init = "magic" }', "methods.x.recipe", "weight_init"),
    ('selector_options = { per_step = -1 }', "methods.x.selector_options", "per_step"),
])
def test_bad_plugin_options_fail_before_work(tmp_path, table, key, reason):
    text = GOOD.replace('methods = ["fp", "rtn"]', 'methods = ["fp", "x"]')
    text += f'\n[methods.x]\npreset = "brecq"\n{table}\n'
    with pytest.raises(SuiteError) as info:
        prepare(write(tmp_path, text))
    assert info.value.key == key
    assert reason in info.value.reason


def test_readme_suite_example_is_valid(tmp_path):
    import re

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("## Suites"):readme.index("## Metrics")]
    (block,) = re.findall(r"```toml\n(.*?)```", section, re.S)
    (tmp_path / "base.toml").write_text("")
    (tmp_path / "my_weighting.py").write_text("")
    (tmp_path / "data" / "cifar10").mkdir(parents=True)  # the metrics' reference must exist
    np.save(tmp_path / "data" / "cifar10" / "train_x.npy", np.zeros((2, 32, 32, 3), np.uint8))
    loaded, _, cells = prepare(write(tmp_path, block))
    assert len(cells) == 1 + 3 * 3  # fp once, three quantized methods at three bit-widths
