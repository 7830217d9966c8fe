"""The slurm executor without a cluster: sbatch scripts through fake SLURM commands, a tiny suite
on submitit's local cluster with one task killed and resubmitted, and `ptqbench status`."""
import json
import os
import sys
import time
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from ptqbench.cli import cli
from ptqbench.reproducible import differences
from ptqbench.store import Store
from ptqbench.suite.loader import default_suite_path

from test_end_to_end import records

pytest.importorskip("submitit")

# Kills its own process the first time it runs (as a node failure or `scancel -s KILL` would),
# then behaves as the uniform-timestep selector.
DIES_ONCE = '''
import os, signal
from pathlib import Path
from ptqbench import hookimpl
from ptqbench_plugins.selectors.uniform_steps import UniformSteps

class DiesOnce(UniformSteps):
    name = "dies-once"
    description = "SIGKILLs its process on the first call (marker file), to test resubmission"
    def select(self, trajectories, generator, context):
        marker = Path(__file__).with_name("died")
        if not marker.exists():
            marker.write_text("x")
            os.kill(os.getpid(), signal.SIGKILL)
        return super().select(trajectories, generator, context)

@hookimpl
def register_selectors(register):
    register(DiesOnce)
'''

FAKE_SBATCH = """#!/bin/sh
n=$(cat "$FAKE_SLURM/next" 2>/dev/null || echo 100)
echo $((n + 1)) > "$FAKE_SLURM/next"
for last; do :; done
cp "$last" "$FAKE_SLURM/sbatch-$n.sh"
echo "Submitted batch job $n"
"""


def suite_file(folder: Path, name: str, run: str, methods: str = '["fp", "rtn"]') -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(f"""
        [suite]
        name = "tiny-slurm"
        include = ["{default_suite_path()}"]
        plugins = ["dies_once.py"]
        [evaluation]
        num_samples = 16
        batch_size = 16
        [grid]
        bits = ["W8A8"]
        methods = {methods}
        [methods.rtn]
        preset = "rtn"
        selector_options = {{ steps = 2, per_step = 8 }}
        [methods.flaky]
        preset = "rtn"
        selector = "dies-once"
        selector_options = {{ steps = 2, per_step = 8 }}
    """) + textwrap.dedent(run))
    (folder / "dies_once.py").write_text(DIES_ONCE)
    return path


def lock_holders(folder: Path) -> str:
    """Which processes have a lock file of ``folder`` open (Linux /proc), for failure messages."""
    lines = []
    for fd in Path("/proc").glob("[0-9]*/fd/*"):
        try:
            target = os.readlink(fd)
            if target.startswith(str(folder)):
                pid = fd.parts[2]
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                who = "this process" if int(pid) == os.getpid() else cmd[:200]
                lines.append(f"pid {pid} ({who}): {target}")
        except OSError:
            continue
    held = sorted(h.name for h in folder.glob("*.held"))  # heartbeat-file mode (ptqbench.locks)
    return (f"lock files open: {'; '.join(lines) or 'none'}; lock mode "
            f"{os.environ.get('PTQBENCH_LOCKS', 'flock')}; .held files: {held or 'none'}")


def invoke(*args, env=None):
    return CliRunner().invoke(cli, [str(a) for a in args], env=env)


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """sbatch / srun / sacct on PATH: sbatch keeps each script and answers job ids 100, 101, ..."""
    bin_dir = tmp_path / "fake-slurm"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(FAKE_SBATCH)
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "sacct").write_text('#!/bin/sh\ncat "$FAKE_SLURM/sacct.txt" 2>/dev/null\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM", str(bin_dir))
    return bin_dir


def test_missing_submitit_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "submitit", None)  # as if not installed
    suite = suite_file(tmp_path, "s.toml", '[run]\nexecutor = "slurm"\n')
    result = invoke("run", suite, "-o", tmp_path / "out", "--no-progress")
    assert result.exit_code != 0
    assert "needs submitit" in result.output and "ptqbench[slurm]" in result.output
    assert "Traceback" not in result.output


def test_submission_writes_sbatch_options_dependencies_and_status(tmp_path, fake_slurm):
    suite = suite_file(tmp_path, "s.toml", """
        [run]
        executor = "slurm"
        [run.executor_options]
        partition = "gpu"
        account = "proj"
        time = 30
        wait = false
        sbatch = ["--constraint=h200", "#SBATCH --exclusive"]
        setup = ["module load cuda"]
    """)
    out = tmp_path / "out"
    result = invoke("run", suite, "-o", out, "--no-progress")
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())  # rich wraps long lines
    assert "2 submitted" in text and f"ptqbench status {out}" in text
    fp_job, q_job = (fake_slurm / "sbatch-100.sh").read_text(), (fake_slurm / "sbatch-101.sh").read_text()
    for line in ("#SBATCH --partition=gpu", "#SBATCH --account=proj", "#SBATCH --time=30",
                 "#SBATCH --constraint=h200", "#SBATCH --exclusive", "#SBATCH --gpus-per-node=1",
                 "module load cuda"):
        assert line in fp_job and line in q_job
    assert "--dependency" not in fp_job
    assert "#SBATCH --dependency=afterany:100" in q_job  # quantized cells after the FP array
    assert not (out / "records").exists()  # nothing ran here

    subs = [json.loads(p.read_text()) for p in (out / "slurm" / "submissions").glob("*.json")]
    jobs = {s["tasks"][0]["tasks"][0][1]: s["tasks"][0]["job_id"] for s in subs}
    fp_key, q_key = sorted(jobs, key=lambda k: jobs[k])
    (fake_slurm / "sacct.txt").write_text(f"{jobs[fp_key]}|RUNNING\n{jobs[q_key]}|PENDING\n")
    rows = [line.split("\t") for line in
            invoke("status", out, "--plain").output.strip().splitlines()]
    assert {r[1]: (r[0], r[3]) for r in rows} == {fp_key: ("running", "100"),
                                                  q_key: ("pending", "101")}

    # the FP task finished and wrote its record; the quantized one was cancelled
    Store(out).write_record(fp_key, {"key": fp_key, "status": "ok", "cell": {"method": "fp"},
                                     "finished": "now"})
    (fake_slurm / "sacct.txt").write_text(f"{jobs[q_key]}|CANCELLED by 42\n")
    rows = {r.split("\t")[1]: r.split("\t") for r in
            invoke("status", out, "--plain").output.strip().splitlines()}
    assert rows[fp_key][0] == "done"
    assert rows[q_key][0] == "missing" and "SLURM: CANCELLED" in rows[q_key][4]
    with Store(out).lock(f"cell-{q_key}"):  # a worker running the cell holds its lock
        assert invoke("status", out, "--plain").output.count("running") == 1
    # the suite's cells that never ran are listed with --suite
    table = invoke("status", out, "--suite", suite)
    assert table.exit_code == 0 and "1 done" in table.output and "1 missing" in table.output


def test_killed_task_is_resubmitted_and_records_match_a_local_run(tmp_path, tiny_model_dir):
    methods = '["fp", "rtn", "flaky"]'
    suite = suite_file(tmp_path, "cluster.toml", """
        [run]
        executor = "slurm"
        executor_options = { cluster = "local", cpus_per_task = 1, gpus_per_task = 0 }
    """, methods)
    out = tmp_path / "cluster"
    first = invoke("run", suite, "-o", out, "--no-progress")
    assert first.exit_code == 1, first.output  # the flaky cell's task was killed
    def states():
        return {r.split("\t")[2].split(" | ")[3]: r.split("\t") for r in
                invoke("status", out, "--plain").output.strip().splitlines()}

    # Status reads "running" while anything holds the killed cell's lock. In CI it did for good:
    # an earlier test of the same pytest worker had leaked PTQBENCH_LOCKS=files into os.environ,
    # and a SIGKILLed holder's heartbeat file read as held for STALE_S (60 s). Both are fixed
    # (ptqbench.locks); the short wait stays for a child process that may outlive the killed task
    # for a moment with the lock file open. A lock held for good still fails here.
    deadline = time.time() + 30
    while (state := states())["flaky"][0] == "running" and time.time() < deadline:
        time.sleep(0.5)
    assert state["fp"][0] == "done" and state["rtn"][0] == "done"
    assert state["flaky"][0] == "failed" and "ended without finishing" in state["flaky"][4], \
        lock_holders(out / "locks")

    again = invoke("run", suite, "-o", out, "--no-progress")  # resubmit: only what is missing
    assert again.exit_code == 0, again.output
    assert "1 ran, 2 already finished, 0 failed" in again.output

    local = suite_file(tmp_path, "local.toml", "", methods)
    ref = tmp_path / "local"
    assert invoke("run", local, "-o", ref, "--no-progress").exit_code == 0
    a = {r["key"]: r for r in records(ref)}
    b = {r["key"]: r for r in records(out)}
    assert set(a) == set(b) and len(b) == 3 and all(r["status"] == "ok" for r in b.values())
    for key in a:  # the project's definition of a reproduced result: all but clocks and host
        assert differences(a[key], b[key], limit=20) == [], key


def test_options_are_checked_and_a_requeued_task_reruns_itself(tmp_path):
    from ptqbench.errors import PtqbenchError
    from ptqbench.pipeline.worker import CellJob
    from ptqbench_plugins.executors.slurm import SlurmExecutor, SlurmTask, parse_sbatch_lines

    assert parse_sbatch_lines(["--constraint=h200", "#SBATCH --mail-type END", "--exclusive"]) \
        == {"constraint": "h200", "mail_type": "END", "exclusive": True}
    with pytest.raises(PtqbenchError, match="not a long option"):
        parse_sbatch_lines(["-p gpu"])
    for bad, match in (({"cluster": "k8s"}, "cluster must be one of"),
                       ({"time": 0}, "time must be an integer >= 1"),
                       ({"sample_shards": 2, "gpus_per_task": 2}, "either sample_shards"),
                       ({"wait": False, "cluster": "local"}, "needs SLURM")):
        with pytest.raises(PtqbenchError, match=match):
            SlurmExecutor(**bad)
    # preemption / time limit: submitit calls checkpoint() and requeues what it returns, the
    # same tasks, which resume from the records, checkpoints and shards in the output folder
    task = SlurmTask(CellJob(suite_file="s.toml", output=str(tmp_path)), [["cell", "k", 0, 0]])
    again = task.checkpoint()
    assert again.function is task and again.args == () and again.kwargs == {}
