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
    block = re.findall(r"```toml\n(.*?)```", section, re.S)[0]  # the suite example comes first
    (tmp_path / "base.toml").write_text("")
    (tmp_path / "my_weighting.py").write_text("")
    (tmp_path / "data" / "cifar10").mkdir(parents=True)  # the metrics' reference must exist
    np.save(tmp_path / "data" / "cifar10" / "train_x.npy", np.zeros((2, 32, 32, 3), np.uint8))
    loaded, _, cells = prepare(write(tmp_path, block))
    assert len(cells) == 1 + 3 * 3  # fp once, three quantized methods at three bit-widths


# ---- issue 13: bad input never shows a traceback ----------------------------------------------
def dry_run(path: Path, *extra: str):
    result = CliRunner().invoke(cli, ["run", str(path), "--dry-run", *extra])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and result.exception is None or \
        isinstance(result.exception, SystemExit)
    return result.output


def test_binary_suite_file(tmp_path):
    path = tmp_path / "suite.toml"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff binary")
    out = dry_run(path)
    assert f"{path}: not UTF-8 text (byte 0: b'\\x89')" in out


def test_empty_suite_file_is_an_error(tmp_path):
    out = dry_run(write(tmp_path, ""))
    assert "empty suite: it declares nothing" in out and "0 cells" not in out


def test_array_of_tables_where_a_table_is_expected(tmp_path):
    text = GOOD.replace('[models.m]', '[[models]]')
    out = dry_run(write(tmp_path, text))
    assert ("models: expected a table, got an array of tables (write one [models.NAME] table "
            "per entry, not [[models]])") in out


def test_missing_metric_reference_fails_before_any_work(tmp_path):
    text = GOOD.replace("batch_size = 4", 'batch_size = 4\nmetrics = ["paired", "fid"]\n'
                                          'metric_options.fid = { reference = "data/train.npy" }')
    out = dry_run(write(tmp_path, text))
    assert (f"evaluation.metric_options.fid: reference {tmp_path / 'data' / 'train.npy'} "
            f"does not exist") in out


@pytest.mark.parametrize("where", ["proc", "under-a-file"])
def test_output_folder_that_cannot_be_created(tmp_path, where):
    if where == "proc":
        if not Path("/proc/self").is_dir():
            pytest.skip("no /proc here")
        output, reason = "/proc/ptqbench-out", "cannot be created in /proc"
    else:
        (tmp_path / "a-file").write_text("")
        output, reason = str(tmp_path / "a-file" / "out"), "is a file, not a folder"
    path = write(tmp_path, GOOD.replace('output = "out"', f'output = "{output}"'))
    out = dry_run(path)
    assert f"suite.output: {output}: " in out and reason in out
    assert f"--output {output}: " in dry_run(write(tmp_path, GOOD, "other.toml"), "-o", output)
    # and `run` stops there too, before any work
    result = CliRunner().invoke(cli, ["run", str(path), "--no-progress"])
    assert result.exit_code == 1 and reason in result.output and "Traceback" not in result.output


EXTRA = "\n[methods.x]\npreset = \"rtn\"\n"


@pytest.mark.parametrize("old,new,key,reason", [
    # shapes: table / list / scalar where another is expected, at several depths
    ('[samplers.s]\nsteps = 5', '[samplers]\ns = 5', "samplers.s", "expected a table, got 5"),
    ('[samplers.s]\nsteps = 5', '[samplers]\ns = [1, 2]', "samplers.s", "expected a table, got a list"),
    ('bits = ["W8A8"]', 'bits = "W8A8"', "grid.bits", "expected a list, got 'W8A8'"),
    ('bits = ["W8A8"]', 'bits = [["W8A8"]]', "grid.bits[0]", "expected a string, got a list"),
    ('bits = ["W8A8"]', 'bits = [{ w = 8 }]', "grid.bits[0]", "expected a string, got a table"),
    ('[grid]', '[grid.sub]\nx = 1\n[grid]', "grid.sub", "unknown key"),
    ('[suite]', '[[suite]]', "suite", "expected a table, got an array of tables"),
    ('[evaluation]', '[evaluation]\nmetric_options = [1]', "evaluation.metric_options",
     "expected a table, got a list"),
    ('[evaluation]', '[evaluation]\nmetric_options.paired = 3', "evaluation.metric_options.paired",
     "expected a table, got 3"),
    # types and ranges
    ('steps = 5', 'steps = 5.5', "samplers.s.steps", "expected an integer, got 5.5"),
    ('steps = 5', 'steps = true', "samplers.s.steps", "expected an integer, got True"),
    ('steps = 5', 'steps = 100000', "samplers.s.steps", "must be in [1, 10000]"),
    ('steps = 5', 'steps = 5\neta = nan', "samplers.s.eta", "must be in [0, 1], got nan"),
    ('methods = ["fp", "rtn"]', 'methods = ["fp", "rtn"]\nseeds = [-1]', "grid.seeds[0]",
     "must be in [0, 2**63)"),
    ('batch_size = 4', 'batch_size = -4', "evaluation.batch_size", "must be >= 1"),
    ('[evaluation]', '[methods.rtn]\npreset = "rtn"\ncalibration_batch_size = 0\n[evaluation]',
     "methods.rtn.calibration_batch_size", "must be >= 1, got 0"),
    # unknown names
    ('steps = 5', 'steps = 5\nkind = "euler"', "samplers.s.kind", "unknown sampler 'euler'"),
    ('[evaluation]', '[run]\nexecutor = "nope"\n[evaluation]', "run.executor",
     "unknown executor plugin 'nope'"),
    ('batch_size = 4', 'batch_size = 4\nmetrics = ["nope"]', "evaluation.metrics[0]",
     "unknown metric plugin 'nope'"),
    ('path = "builtin:tiny-mnist"', 'path = "builtin:tiny-mnist"\nplugin = "nope"',
     "models.m.plugin", "unknown model plugin 'nope'"),
    ('path = "builtin:tiny-mnist"', 'path = "builtin:nope"', "models.m.path", "no built-in model"),
    ('path = "builtin:tiny-mnist"', 'path = "builtin:tiny-mnist"\noptions = { colour = 1 }',
     "models.m.options", "unexpected keyword argument 'colour'"),
    ('[evaluation]', '[run]\nexecutor_options = { gpus = 2 }\n[evaluation]',
     "run.executor_options", "unexpected keyword argument 'gpus'"),
    # missing files
    ('[suite]', '[suite]\nplugins = ["nope.py"]', "suite.plugins[0]", "plugin file not found"),
    ('[suite]', '[suite]\ninclude = ["nope.toml"]', "suite.include[0]", "included file not found"),
    ('batch_size = 4', 'batch_size = 4\nmetrics = ["fid"]\nmetric_options.fid = '
     '{ reference = "x.npy", weights = "w.pth" }', "evaluation.metric_options.fid",
     "Inception weights file"),
    # unusable output folders
    ('[evaluation]', '[run]\ncache_dir = "/dev/null/cache"\n[evaluation]', "run.cache_dir",
     "/dev/null is a file, not a folder"),
])
def test_classes_of_input_problems(tmp_path, old, new, key, reason):
    assert old in GOOD
    path = write(tmp_path, GOOD.replace(old, new, 1))
    with pytest.raises(SuiteError) as info:
        prepare(path)
    hits = [p for p in info.value.problems if p.key == key]
    assert hits, [str(p) for p in info.value.problems]
    assert reason in hits[0].reason and hits[0].file == str(path)
    assert "\n" not in str(hits[0])


def test_a_bad_plugin_file_is_reported_with_its_key(tmp_path):
    (tmp_path / "broken.py").write_text("import no_such_module_here\n")
    path = write(tmp_path, GOOD.replace("[suite]", '[suite]\nplugins = ["broken.py"]'))
    with pytest.raises(SuiteError) as info:
        prepare(path)
    assert info.value.key == "suite.plugins[0]" and "no_such_module_here" in info.value.reason


def test_several_problems_are_reported_together(tmp_path):
    # shapes and types first: every one of them at once
    text = (GOOD.replace("steps = 5", 'steps = "5"\nspeed = 2')
            .replace('bits = ["W8A8"]', 'bits = ["W8A8", "W9A9"]')
            .replace("num_samples = 8", "num_samples = [8]"))
    with pytest.raises(SuiteError) as info:
        load_suite(write(tmp_path, text))
    assert {p.key for p in info.value.problems} == {
        "samplers.s.speed", "samplers.s.steps", "grid.bits[1]", "evaluation.num_samples"}
    # then names, files, options and folders: every one of them at once
    text = (GOOD.replace('path = "builtin:tiny-mnist"', 'path = "./no-model"')
            .replace('methods = ["fp", "rtn"]', 'methods = ["fp", "rtn", "nosuch"]')
            .replace('output = "out"', 'output = "/dev/null/out"')
            .replace("batch_size = 4", 'batch_size = 4\nmetrics = ["paired", "fid"]\n'
                                       'metric_options.fid = { reference = "ref.npy" }')
            + '\n[methods.rtn]\npreset = "rtn"\nselector_options = { per_step = -1 }\n')
    path = write(tmp_path, text, "second.toml")
    result = CliRunner().invoke(cli, ["run", str(path), "--dry-run"])
    assert result.exit_code == 1 and "5 problems in the suite" in result.output
    lines = [ln.strip() for ln in result.output.splitlines() if ln.startswith("  ")]
    assert [ln.split(": ")[1] for ln in lines] == [
        "grid.methods[2]", "models.m.path", "methods.rtn.selector_options",
        "evaluation.metric_options.fid", "suite.output"]
    assert all(ln.startswith(str(path)) for ln in lines)


@pytest.mark.parametrize("command", ["run", "dry-run", "plugins", "diagnose"])
def test_every_command_runs_the_same_checks(tmp_path, command):
    text = (GOOD.replace('path = "builtin:tiny-mnist"', 'path = "./no-model"')
            .replace("batch_size = 4", 'batch_size = 4\nmetrics = ["paired", "fid"]\n'
                                       'metric_options.fid = { reference = "ref.npy" }'))
    path = write(tmp_path, text)
    args = {"run": ["run", str(path), "--no-progress"], "dry-run": ["run", str(path), "--dry-run"],
            "plugins": ["plugins", "--suite", str(path)],
            "diagnose": ["diagnose", "--suite", str(path), "--block", "conv_in", "--out",
                         str(tmp_path / "diag")]}[command]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1, result.output
    assert "2 problems in the suite" in result.output and "Traceback" not in result.output
    assert f"{path}: models.m.path: model folder not found" in result.output
    assert f"{path}: evaluation.metric_options.fid: reference" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["suite.toml"]  # no work, no folders


@pytest.mark.parametrize("value", ["a\\u0000b", "a" * 5000, "~no-such-user-here/x"])
@pytest.mark.parametrize("key", ["include", "plugins", "output", "cache_dir", "model", "reference"])
def test_paths_the_os_rejects_are_user_errors(tmp_path, key, value):
    text = {"include": GOOD.replace("[suite]", f'[suite]\ninclude = ["{value}"]'),
            "plugins": GOOD.replace("[suite]", f'[suite]\nplugins = ["{value}"]'),
            "output": GOOD.replace('output = "out"', f'output = "{value}"'),
            "cache_dir": GOOD + f'\n[run]\ncache_dir = "{value}"\n',
            "model": GOOD.replace("builtin:tiny-mnist", value),
            "reference": GOOD.replace("batch_size = 4", 'batch_size = 4\nmetrics = ["fid"]\n'
                                      f'metric_options.fid = {{ reference = "{value}" }}')}[key]
    with pytest.raises(SuiteError) as info:
        prepare(write(tmp_path, text))
    assert all("\n" not in str(p) for p in info.value.problems)


def test_type_problems_and_file_problems_are_reported_together(tmp_path):
    text = (GOOD.replace("steps = 5", 'steps = "5"')
            .replace('path = "builtin:tiny-mnist"', 'path = "./no-model"')
            .replace('methods = ["fp", "rtn"]', 'methods = ["fp", "rtn", "nosuch"]')
            .replace('output = "out"', 'output = "/dev/null/out"')
            .replace("batch_size = 4", 'batch_size = 4\nmetrics = ["paired", "fid"]\n'
                                       'metric_options.fid = { reference = "ref.npy" }'))
    with pytest.raises(SuiteError) as info:
        prepare(write(tmp_path, text))
    # [samplers] cannot be read: grid.samplers[0] 's' is not reported as undeclared
    assert [p.key for p in info.value.problems] == [
        "samplers.s.steps", "grid.methods[2]", "models.m.path", "evaluation.metric_options.fid",
        "suite.output"]
