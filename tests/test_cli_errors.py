"""The CLI's top-level handler: an unexpected exception prints a short message and the path of
a log file with the full traceback (exit 70); --debug lets the traceback through; user errors
stay one clear message (exit 1) and write no log."""
import subprocess
import sys
import textwrap

from click.testing import CliRunner

from ptqbench.cli import cli
from ptqbench.cli_errors import INTERNAL_ERROR_EXIT

BUGGY_EXECUTOR = '''
from ptqbench import Executor, hookimpl


class Buggy(Executor):
    name = "buggy"
    description = "an executor with a bug: it fails before running any cell"

    def devices(self):
        return []

    def run_cells(self, cells, run_one):
        return {}["no such key"]


@hookimpl
def register_executors(register):
    register(Buggy)
'''


def buggy_suite(tmp_path):
    (tmp_path / "buggy.py").write_text(BUGGY_EXECUTOR)
    path = tmp_path / "suite.toml"
    path.write_text(textwrap.dedent(f"""
        [suite]
        output = "{tmp_path / 'out'}"
        plugins = ["buggy.py"]
        [models.m]
        path = "builtin:tiny-mnist"
        [samplers.s]
        steps = 2
        [grid]
        models = ["m"]
        samplers = ["s"]
        methods = ["fp"]
        [run]
        executor = "buggy"
    """))
    return path


def test_unexpected_error_prints_a_short_message_and_a_log_path(tmp_path, monkeypatch):
    logs = tmp_path / "logs"
    monkeypatch.setenv("PTQBENCH_LOG_DIR", str(logs))
    result = CliRunner().invoke(cli, ["run", str(buggy_suite(tmp_path)), "--no-progress"])
    assert result.exit_code == INTERNAL_ERROR_EXIT, result.output
    assert "Traceback" not in result.output
    assert "unexpected error: KeyError: 'no such key'" in result.output
    (log,) = logs.glob("crash-*.log")
    assert f"the full traceback is in {log}" in " ".join(result.output.split())
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and "run_cells" in text
    assert text.startswith("command: ")


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("PTQBENCH_LOG_DIR", str(tmp_path / "logs"))
    result = CliRunner().invoke(cli, ["--debug", "run", str(buggy_suite(tmp_path)),
                                      "--no-progress"])
    assert isinstance(result.exception, KeyError)  # not turned into a message
    assert not (tmp_path / "logs").exists()


def test_debug_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("PTQBENCH_LOG_DIR", str(tmp_path / "logs"))
    result = CliRunner().invoke(cli, ["run", str(buggy_suite(tmp_path)), "--no-progress"],
                                env={"PTQBENCH_DEBUG": "1"})
    assert isinstance(result.exception, KeyError)


def test_a_real_process_prints_no_traceback(tmp_path):
    env = {"PTQBENCH_LOG_DIR": str(tmp_path / "logs"), "PTQBENCH_LOAD_EXTERNAL_PLUGINS": "0",
           "PATH": "/usr/bin:/bin"}
    cmd = [sys.executable, "-m", "ptqbench.cli", "run", str(buggy_suite(tmp_path)),
           "--no-progress"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == INTERNAL_ERROR_EXIT
    assert "Traceback" not in proc.stderr and "crash-" in proc.stderr


def test_user_errors_stay_one_message_without_a_log(tmp_path, monkeypatch):
    monkeypatch.setenv("PTQBENCH_LOG_DIR", str(tmp_path / "logs"))
    result = CliRunner().invoke(cli, ["report", str(tmp_path / "nothing")])
    assert result.exit_code == 1
    assert result.output.strip() == f"Error: results folder not found: {tmp_path / 'nothing'}"
    assert not (tmp_path / "logs").exists()
