"""Plugin registry: built-ins via entry points, local files, the README's plugin, errors."""
import re
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from ptqbench import Weighting, hookimpl
from ptqbench.cli import cli
from ptqbench.errors import PtqbenchError, UnknownPluginError
from ptqbench.registry import Registry, default_registry

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 1)
    return text[start:end if end != -1 else None]


def readme_blocks(title: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", readme_section(title), re.S)


def test_builtins_come_from_the_entry_point_group():
    reg = default_registry(include_external=False)
    for family, name in [("models", "diffusers-unet"), ("executors", "local"),
                         ("weightings", "uniform"), ("selectors", "uniform-steps")]:
        info = reg.get(family, name)
        assert info.source.startswith("ptqbench "), info.source  # dist name + version + module
        assert info.description


def test_unknown_name_lists_known():
    reg = default_registry(include_external=False)
    with pytest.raises(UnknownPluginError, match="known: .*uniform"):
        reg.get("weightings", "no-such-weighting")


def test_registered_class_must_subclass_the_family_base(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(textwrap.dedent("""
        from ptqbench import hookimpl
        class NotAWeighting:
            name = "x"
        @hookimpl
        def register_weightings(register):
            register(NotAWeighting)
    """))
    reg = Registry()
    reg.load_file(bad)
    with pytest.raises(PtqbenchError, match="not a subclass of ptqbench.Weighting"):
        reg.names("weightings")


def test_duplicate_names_are_rejected(tmp_path):
    class Mine(Weighting):
        name = "uniform"

        def weights(self, idx):
            return None

    class Plugin:
        @hookimpl
        def register_weightings(self, register):
            register(Mine)

    reg = default_registry(include_external=False)
    reg.register_module(Plugin(), "dup")
    with pytest.raises(PtqbenchError, match="registered twice"):
        reg.names("weightings")


def test_readme_weighting_plugin_works_as_documented(tmp_path):
    """Write the plugin exactly as the README shows it and use it as the README says."""
    (code,) = readme_blocks("Write your own weighting plugin", "python")
    plugin = tmp_path / "late_steps.py"
    plugin.write_text(code)
    reg = Registry()
    reg.load_entry_points(include_external=False)
    reg.load_file(plugin)
    info = reg.get("weightings", "late-steps")
    assert info.source == f"file:{plugin.resolve()}"
    # behave like the reconstruction loop: prepare once, then ask for minibatch weights
    import torch

    from ptqbench import CalibSet, RunContext

    step = torch.tensor([0, 0, 1, 1, 2, 2])
    calib = CalibSet(torch.zeros(6, 1, 2, 2), step * 100, step)
    w = reg.create("weightings", "late-steps", {"strength": 2.0})
    w.prepare(calib, None, RunContext(device=torch.device("cpu"), seed=0, work_dir=tmp_path,
                                      cache_dir=tmp_path))
    all_w = w.weights(torch.arange(6))
    assert torch.allclose(all_w.mean(), torch.tensor(1.0))
    assert all_w[5] > all_w[0]  # low-noise steps count more


def test_plugins_command_lists_suite_plugin(tmp_path):
    (code,) = readme_blocks("Write your own weighting plugin", "python")
    (tmp_path / "late_steps.py").write_text(code)
    toml_blocks = readme_blocks("Write your own weighting plugin", "toml")
    suite = tmp_path / "my-suite.toml"
    suite.write_text(toml_blocks[0] + textwrap.dedent("""
        [models.m]
        path = "builtin:tiny-mnist"
        [samplers.s]
        steps = 4
        [grid]
        models = ["m"]
        samplers = ["s"]
        bits = ["W8A8"]
        methods = ["rtn-late"]
    """))
    result = CliRunner().invoke(cli, ["plugins", "--suite", str(suite), "--plain"])
    assert result.exit_code == 0, result.output
    rows = [line.split("\t") for line in result.output.splitlines() if "\t" in line]
    assert ["weightings", "late-steps", f"file:{(tmp_path / 'late_steps.py').resolve()}",
            "Linear ramp of weights over sampler steps, low noise counts most"] in rows
    assert any(r[:2] == ["executors", "local"] for r in rows)
