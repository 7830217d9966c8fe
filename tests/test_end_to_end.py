"""The embedded default end to end on the bundled tiny model, a failing cell, kill and resume."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from click.testing import CliRunner

from ptqbench.cli import cli
from ptqbench.suite.loader import default_suite_path


def small_tiny_suite(tmp_path: Path, extra: str = "", num_samples: int = 32,
                     plugins: tuple = ()) -> Path:
    """The embedded tiny suite with fewer samples, through `include` (as a user would)."""
    suite = tmp_path / "small.toml"
    suite.write_text(textwrap.dedent(f"""
        [suite]
        name = "tiny-small"
        include = ["{default_suite_path()}"]
        plugins = {list(plugins)!r}
        [evaluation]
        num_samples = {num_samples}
        batch_size = 16
    """) + textwrap.dedent(extra))
    return suite


def records(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "records").glob("*.json"))]


def test_tiny_suite_end_to_end(tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["run", str(small_tiny_suite(tmp_path)), "-o", str(out),
                                      "--no-progress"])
    assert result.exit_code == 0, result.output
    recs = {(r["cell"]["method"], r["cell"]["bits"]): r for r in records(out)}
    assert set(recs) == {("fp", "FP"), ("rtn", "W8A8"), ("rtn", "W4A8")}
    assert all(r["status"] == "ok" for r in recs.values())
    w8 = recs[("rtn", "W8A8")]["metrics"]["paired_mse"]["value"]
    w4 = recs[("rtn", "W4A8")]["metrics"]["paired_mse"]["value"]
    assert 0 < w8 < w4  # fewer bits, larger error against the FP samples
    rtn = recs[("rtn", "W4A8")]
    assert rtn["coverage"] and rtn["git"]["commit"] is not None and rtn["versions"]["torch"]
    assert {"sample", "metrics", "quantize"} <= set(rtn["costs"]["seconds"])
    # sampling ran the (exact) fast path by default, and says so with its numerics
    assert rtn["numerics"]["execution"]["mode"] == "fast"
    assert rtn["numerics"]["execution"]["dtype"] == "fp32" and not rtn["numerics"]["execution"]["tf32"]
    assert rtn["numerics"]["manifest"]["folded_layers"] == rtn["coverage"]["counts"]["quantized_layers"]
    assert rtn["sampling"]["img_steps_per_s"] > 0 and rtn["costs"]["peak_host_mb"]["sample"] > 0
    assert "rtn" in result.output and "W4A8" in result.output  # the leaderboard was printed

    # a rerun finds every cell finished and does no work
    again = CliRunner().invoke(cli, ["run", str(small_tiny_suite(tmp_path)), "-o", str(out),
                                     "--no-progress"])
    assert again.exit_code == 0 and "3 already finished" in again.output
    assert "other ptqbench/plugin sources" not in again.output

    # a record made by other code is kept, and the run says so (keys do not hash the code)
    path = out / "records" / f"{rtn['key']}.json"
    stale = json.loads(path.read_text())
    stale["code"]["ptqbench"]["sha256"] = "0" * 64
    path.write_text(json.dumps(stale))
    third = CliRunner().invoke(cli, ["run", str(small_tiny_suite(tmp_path)), "-o", str(out),
                                     "--no-progress"])
    assert third.exit_code == 0 and "3 already finished" in third.output
    assert "1 finished cells" in third.output and rtn["key"] in third.output
    dry = CliRunner().invoke(cli, ["run", str(small_tiny_suite(tmp_path)), "-o", str(out),
                                   "--dry-run"])
    assert "[ok, other code]" in dry.output


FAILING_PLUGIN = '''
from ptqbench import Weighting, hookimpl

class Exploding(Weighting):
    name = "exploding"
    description = "raises, to test that a failing cell does not stop the suite"
    def prepare(self, calib, val, context):
        raise RuntimeError("weighting exploded on purpose")
    def weights(self, idx):
        return None

@hookimpl
def register_weightings(register):
    register(Exploding)
'''


def test_failing_cell_is_recorded_and_suite_goes_on(tmp_path, tiny_model_dir):
    (tmp_path / "exploding.py").write_text(FAILING_PLUGIN)
    suite = small_tiny_suite(tmp_path, """
        [grid]
        bits = ["W8A8"]
        methods = ["fp", "boom", "rtn"]
        [methods.boom]
        preset = "rtn"
        weighting = "exploding"
    """, num_samples=8, plugins=("exploding.py",))
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["run", str(suite), "-o", str(out), "--no-progress"])
    assert result.exit_code == 1
    recs = {r["cell"]["method"]: r for r in records(out)}
    assert recs["boom"]["status"] == "failed"
    assert "exploded on purpose" in recs["boom"]["error"]["message"]
    assert recs["rtn"]["status"] == "ok" and recs["fp"]["status"] == "ok"


def test_killed_run_resumes_without_loss(tmp_path, tiny_model_dir):
    suite = small_tiny_suite(tmp_path, num_samples=48)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "ptqbench.cli", "run", str(suite), "-o", str(out), "--no-progress"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # one torch thread: conftest's OMP_NUM_THREADS
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    # kill -9 as soon as the first cell has its record: the next cell is then mid-way
    while time.time() < deadline and proc.poll() is None and not list((out / "records").glob("*.json")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = records(out)
    assert len(first) >= 1 and all(r["status"] == "ok" for r in first)

    try:  # the resumed run's own output, whichever way it fails (it did once in a full run)
        again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"the resumed run did not end in 300 s: {exc.stderr!r:.3000}")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    final = records(out)
    assert len(final) == 3 and all(r["status"] == "ok" for r in final)
    by_key = {r["key"]: r for r in final}
    for r in first:  # finished cells were not redone
        assert by_key[r["key"]]["started"] == r["started"]
    leftovers = [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []


def test_run_selects_part_of_a_suite(tmp_path, tiny_model_dir):
    suite = small_tiny_suite(tmp_path, num_samples=8)
    dry = CliRunner().invoke(cli, ["run", str(suite), "--dry-run", "--bits", "W4A8"])
    assert dry.exit_code == 0, dry.output
    assert "2 cells" in dry.output and "| FP |" in dry.output and "W8A8" not in dry.output
    # FP comes along with the chosen cell: it is paired with it
    bad = CliRunner().invoke(cli, ["run", str(suite), "--dry-run", "--method", "gac"])
    assert bad.exit_code != 0 and "--method gac: not in this suite" in bad.output
    key = [ln.split()[0] for ln in dry.output.splitlines() if "W4A8" in ln][0]
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["run", str(suite), "-o", str(out), "--cell", key[:6],
                                      "--no-progress"])
    assert result.exit_code == 0, result.output
    assert sorted(r["cell"]["bits"] for r in records(out)) == ["FP", "W4A8"]
