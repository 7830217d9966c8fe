"""Runs cells as SLURM job arrays, through submitit (``pip install 'ptqbench[slurm]'``).

One job array per wave of tasks (:mod:`ptqbench.pipeline.tasks`): FP cells, then quantized
cells (with ``sample_shards``: prepare and FP shards, quantized shards, finish). An array task
runs ``cells_per_task`` tasks in a row on one GPU, or, with ``gpus_per_task > 1``, its cells on
its GPUs at once (the multi-gpu executor inside the job, each cell's sampling split over them).

Resume lives in the output folder, not in SLURM: every task writes the records, shards and
checkpoints of a local run, so resubmitting a suite runs only the cells without a finished
record, and a task that is preempted or hits its time limit is requeued (submitit's checkpoint)
and resumes from the block checkpoints and sample shards it left. Each submission is written to
``<output>/slurm/submissions/<time>-<job id>.json`` (which task runs which cells), which ``ptqbench
status`` reads; job logs go to ``<output>/slurm/logs``.

``cluster = "local"`` or ``"debug"`` runs the same job arrays with submitit's local executor
(subprocesses) or in this process, without a cluster (tests, a workstation).
"""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Optional

import torch

from ptqbench import Executor, hookimpl
from ptqbench.errors import PtqbenchError
from ptqbench.pipeline.tasks import Task, parse_shards, plan, run_task_in_worker
from ptqbench.store import atomic_write_json

CLUSTERS = ("slurm", "local", "debug")


def require_submitit():
    try:
        import submitit
    except ImportError:
        raise PtqbenchError('executor "slurm" needs submitit, which is not installed: '
                            "pip install 'ptqbench[slurm]' (or: pip install submitit)") from None
    return submitit


class SlurmExecutor(Executor):
    name = "slurm"
    description = ("Submit cells as SLURM job arrays with submitit (options: partition, time "
                   "[minutes], gpus_per_task, cpus_per_task, mem_gb, account, qos, "
                   "array_parallelism, cells_per_task, sample_shards, sbatch [extra lines], "
                   "setup, wait, cluster: slurm/local/debug)")

    def __init__(self, partition: Optional[str] = None, time: int = 240, gpus_per_task: int = 1,
                 cpus_per_task: int = 8, mem_gb: Optional[float] = None,
                 account: Optional[str] = None, qos: Optional[str] = None,
                 array_parallelism: int = 64, cells_per_task: int = 1, sample_shards: int = 1,
                 sbatch: list = (), setup: list = (), wait: bool = True, cluster: str = "slurm",
                 max_requeues: int = 3, device: str = "auto"):
        super().__init__(partition=partition, time=time, gpus_per_task=gpus_per_task,
                         cpus_per_task=cpus_per_task, mem_gb=mem_gb, account=account, qos=qos,
                         array_parallelism=array_parallelism, cells_per_task=cells_per_task,
                         sample_shards=sample_shards, sbatch=list(sbatch), setup=list(setup),
                         wait=wait, cluster=cluster, max_requeues=max_requeues, device=device)
        self.submitit = require_submitit()
        if cluster not in CLUSTERS:
            raise PtqbenchError(f"executor slurm: cluster must be one of {', '.join(CLUSTERS)}, "
                                f"got {cluster!r}")
        for key, value, least in (("time", time, 1), ("gpus_per_task", gpus_per_task, 0),
                                  ("cpus_per_task", cpus_per_task, 1),
                                  ("cells_per_task", cells_per_task, 1),
                                  ("array_parallelism", array_parallelism, 1),
                                  ("max_requeues", max_requeues, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise PtqbenchError(f"executor slurm: {key} must be an integer >= {least}, "
                                    f"got {value!r}")
        self.sample_shards = parse_shards(sample_shards, "slurm")
        if gpus_per_task > 1 and self.sample_shards > 1:
            raise PtqbenchError("executor slurm: use either sample_shards (one cell's sampling over "
                                "several tasks) or gpus_per_task > 1 (over the GPUs of one task)")
        if not wait and cluster != "slurm":
            raise PtqbenchError(f'executor slurm: wait = false needs SLURM\'s job dependencies; '
                                f'cluster "{cluster}" has none')
        self.extra = parse_sbatch_lines(sbatch)
        self.options = dict(self.options)
        self.device = device

    def devices(self):
        return []  # decided by SLURM, per task

    # ---- submission -------------------------------------------------------------------
    def _executor(self, folder: Path, dependency: Optional[str], name: str):
        o = self.options
        try:
            ex = self.submitit.AutoExecutor(folder=str(folder / "%j"), cluster=o["cluster"],
                                            slurm_max_num_timeout=o["max_requeues"])
        except RuntimeError as exc:  # no srun: not on a SLURM cluster
            raise PtqbenchError(f'executor slurm: {exc} (cluster = "local" runs the job arrays '
                                f'on this machine)') from None
        params = dict(name=name, timeout_min=int(o["time"]), gpus_per_node=int(o["gpus_per_task"]),
                      cpus_per_task=int(o["cpus_per_task"]), tasks_per_node=1, nodes=1)
        if o["mem_gb"]:
            params["mem_gb"] = float(o["mem_gb"])
        if o["cluster"] == "slurm":
            extra = dict(self.extra)
            if dependency:
                extra["dependency"] = dependency
            params.update(slurm_array_parallelism=int(o["array_parallelism"]),
                          slurm_additional_parameters=extra, slurm_setup=list(o["setup"]))
            if o["partition"]:
                params["slurm_partition"] = o["partition"]
            if o["account"]:
                params["slurm_account"] = o["account"]
            if o["qos"]:
                params["slurm_qos"] = o["qos"]
        elif o["cluster"] == "local":
            params["local_setup"] = list(o["setup"])
        try:
            ex.update_parameters(**params)
        except (ValueError, AssertionError) as exc:
            raise PtqbenchError(f"executor slurm: submitit refused the options: {exc}") from None
        return ex

    def run_cells(self, cells, run_one):
        if not cells:
            return
        by_key = {c.key: c for c in cells}
        ev = run_one.runner.loaded.suite.evaluation
        root = Path(run_one.job.output) / "slurm"
        per_task = int(self.options["cells_per_task"])
        previous: Optional[str] = None
        for number, wave in enumerate(plan(cells, ev.num_samples, ev.batch_size, self.sample_shards)):
            groups = [wave[i:i + per_task] for i in range(0, len(wave), per_task)]
            dependency = f"afterany:{previous}" if previous and not self.options["wait"] else None
            ex = self._executor(root / "logs", dependency, name=f"ptqbench-{wave[0].kind}")
            calls = [SlurmTask(run_one.job, [t.as_list() for t in g], self.device,
                               int(self.options["cpus_per_task"]), int(self.options["gpus_per_task"]))
                     for g in groups]
            try:
                jobs = ex.submit_array(calls)
            except Exception as exc:  # sbatch refused (bad partition, account, ...)
                raise PtqbenchError(f"executor slurm: submitting {len(calls)} tasks failed: "
                                    f"{exc}") from None
            previous = jobs[0].job_id.split("_")[0]
            write_submission(root, previous, self.options["cluster"], number, groups, jobs)
            self._log(run_one, f"submitted {len(jobs)} tasks ({wave[0].kind}) as job "
                               f"{previous} ({self.options['cluster']})")
            if not self.options["wait"]:
                for g in groups:
                    for t in g:
                        if t.runs_cell:
                            run_one.submitted(by_key[t.key], previous)
                continue
            for group, job in zip(groups, jobs):
                self._collect(group, job, by_key, run_one)

    def _collect(self, group: list[Task], job, by_key, run_one) -> None:
        """Wait for one array task; hand its records on, and fail the cells of a task that
        died (killed, out of time with no requeue left, out of memory) like a dead worker."""
        try:
            for record in job.result():
                run_one.finished(by_key[record["key"]], record)
            return
        except Exception as exc:  # submitit: UncompletedJobError / FailedJobError
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        for task in group:
            if not task.runs_cell:
                continue
            cell = by_key[task.key]
            record = run_one.runner.store.read_record(cell.key)
            if record is not None and record.get("status") == "ok":
                # finished before the task died (it was not ok when submitted; no clock
                # comparison: the hosts of a cluster and its file server disagree on time)
                run_one.finished(cell, record)
            else:
                run_one.crashed(cell, None, f"SLURM task {job.job_id} ended without finishing "
                                            f"this cell: {reason}")

    @staticmethod
    def _log(run_one, msg: str) -> None:
        if run_one.reporter is not None:
            run_one.reporter.log(msg)


class SlurmTask:
    """What one array task runs: a few tasks of one suite run, in order, on this node's GPU(s).

    ``checkpoint`` makes submitit requeue it when SLURM signals a time-out or preemption; the
    requeued task reruns the same tasks, which resume from what the output folder holds."""

    def __init__(self, job, tasks: list, device: str = "auto", threads: int = 0, gpus: int = 1):
        self.job, self.tasks, self.device, self.threads, self.gpus = job, tasks, device, threads, gpus

    def __call__(self) -> list[dict]:
        if self.threads:
            torch.set_num_threads(self.threads)
        os.environ.setdefault("PTQBENCH_WORKER", f"{socket.gethostname()} "
                                                 f"{os.environ.get('SLURM_JOB_ID', os.getpid())}")
        tasks = [Task(*t) for t in self.tasks]
        cuda = self.device != "cpu" and torch.cuda.is_available()
        if cuda and self.gpus > 1 and torch.cuda.device_count() > 1:
            return self._on_several_gpus(tasks)
        device = "cuda:0" if cuda else (self.device if self.device not in ("auto", "cuda") else "cpu")
        records = []
        for task in tasks:
            record = run_task_in_worker(self.job, task, device)
            if record is not None:
                records.append(record)
        return records

    def _on_several_gpus(self, tasks: list[Task]) -> list[dict]:
        # the multi-gpu executor on this node's GPUs, each cell's sampling split over all of them
        from ptqbench.pipeline.runner import CellDispatch, RunSummary
        from ptqbench.pipeline.worker import runner_for
        from ptqbench_plugins.executors.multi_gpu import MultiGPUExecutor

        n = torch.cuda.device_count()
        cells = [runner_for(self.job, t.key, "cuda:0")[1] for t in tasks if t.runs_cell]
        runner = runner_for(self.job, tasks[0].key, "cuda:0")[0]
        summary = RunSummary(cells=cells)
        executor = MultiGPUExecutor(devices=[f"cuda:{i}" for i in range(n)], sample_shards=n)
        executor.run_cells(cells, CellDispatch(runner, self.job, summary))
        return [runner.store.read_record(c.key) for c in summary.ok + summary.failed]

    def checkpoint(self, *args, **kwargs):
        import submitit

        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


def parse_sbatch_lines(lines) -> dict:
    """``["--constraint=h200", "--exclusive", "#SBATCH --mail-type END"]`` -> sbatch options."""
    if isinstance(lines, str) or not all(isinstance(x, str) for x in lines):
        raise PtqbenchError(f"executor slurm: sbatch must be a list of option lines such as "
                            f"[\"--constraint=h200\"], got {lines!r}")
    out = {}
    for line in lines:
        text = line.strip()
        if text.startswith("#SBATCH"):
            text = text[len("#SBATCH"):].strip()
        if not text.startswith("--"):
            raise PtqbenchError(f"executor slurm: sbatch line {line!r} is not a long option "
                                f"(--name=value)")
        name, sep, value = text[2:].replace(" ", "=", 1).partition("=")
        out[name.replace("-", "_")] = value.strip() if sep else True
    return out


def write_submission(root: Path, job_id: str, cluster: str, wave: int, groups, jobs) -> Path:
    """``slurm/submissions/<time>-<job id>.json``: which array task runs which tasks of which cells."""
    # one file per submission; the time first, as job ids of the local/debug clusters repeat
    path = root / "submissions" / f"{time.time_ns()}-{job_id}.json"
    atomic_write_json(path, {
        "job_id": job_id, "cluster": cluster, "wave": wave, "host": socket.gethostname(),
        "submitted": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "submitted_unix": time.time(),
        "tasks": [{"job_id": job.job_id, "tasks": [t.as_list() for t in g]}
                  for g, job in zip(groups, jobs)]})
    return path


@hookimpl
def register_executors(register):
    register(SlurmExecutor)
