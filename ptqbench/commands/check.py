"""``ptqbench check``: run a suite (or read a results folder) and compare it with a baseline."""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Optional

import click

from ..errors import PtqbenchError


@click.command("check")
@click.argument("target", required=False, type=click.Path(path_type=Path))
@click.option("--baseline", "baseline_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Baseline file (default for a suite: baselines/<suite file name>.json next "
                   "to the suite file).")
@click.option("--update-baseline", is_flag=True,
              help="Write the baseline from this run instead of comparing (keeps its slack).")
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path),
              help="Results folder of the run, kept afterwards (finished cells in it are reused). "
                   "Default: a fresh temporary folder, deleted afterwards.")
@click.option("--slack", multiple=True, metavar="METRIC=VALUE",
              help="Allowance on top of the statistical tolerance: absolute (paired_mse=0.001) "
                   "or relative (paired_mse=5%); * = every metric; replaces the baseline "
                   "file's slack for that metric (repeatable).")
@click.option("--exact", is_flag=True,
              help="Also fail when a cell's results are not bit-identical to the baseline's "
                   "(deterministic CPU runs of the same code on the same kind of machine).")
@click.option("--allow-missing", is_flag=True,
              help="Baseline cells that this run lacks are reported, not failures.")
@click.option("--summary", type=click.Path(dir_okay=False, path_type=Path),
              help="Write a markdown summary here (default: append to $GITHUB_STEP_SUMMARY "
                   "when that is set).")
@click.option("--device", help="Device for the run: auto, cpu, cuda, cuda:N.")
@click.option("--threads", type=int,
              help="torch CPU threads for the run (default: the baseline's, else torch's).")
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
def check(target, baseline_path, update_baseline, output, slack, exact, allow_missing, summary,
          device, threads, no_progress):
    """Compare TARGET with a baseline; exit 1 when a metric regressed.

    TARGET is a suite file (run here; default: the embedded tiny suite) or a results folder
    (read as it is). Cells are matched by model, sampler, bits, method and seed. A metric
    regresses when it is worse than the baseline's by more than the statistical tolerance
    (paired bootstrap over the samples for paired metrics, else both 95% intervals) plus the
    slack. Failed and missing cells fail the check too; new cells are reported.
    """
    try:
        code = _check(target, baseline_path, update_baseline, output, slack, exact,
                      allow_missing, summary, device, threads, no_progress)
    except PtqbenchError as exc:
        raise click.ClickException(str(exc)) from None
    sys.exit(code)


def _check(target, baseline_path, update_baseline, output, slack_items, exact, allow_missing,
           summary, device, threads, no_progress) -> int:
    from rich.console import Console

    from ..baseline import read_baseline, snapshot, write_baseline
    from ..check import compare, parse_slack, slack_from_baseline
    from ..check_report import print_rich, to_markdown
    from ..report import load_records
    from ..store import Store
    from ..suite.loader import default_suite_path

    console = Console()
    slack = parse_slack(slack_items)  # a typo fails before the run, not after it
    folder = target is not None and Path(target).is_dir()
    if target is not None and not folder and not Path(target).is_file():
        raise PtqbenchError(f"{target}: neither a suite file nor a results folder")
    suite = None if folder else Path(target or default_suite_path())
    if baseline_path is None:
        if suite is None:
            raise PtqbenchError("checking a results folder needs --baseline FILE")
        baseline_path = default_baseline(suite)
    # updating: the old file (if any) still gives its thread count and slack
    base = (read_baseline(baseline_path)
            if not update_baseline or Path(baseline_path).exists() else None)

    if folder:
        records = load_records(target)
        root = Path(target).parent if Path(target).name == "records" else Path(target)
        current = snapshot(records, Store(root))
    else:
        if threads is None and base is not None:
            threads = base.numerics.get("torch_threads")
        current = _run_and_snapshot(suite, output, device, threads, no_progress, console)

    if update_baseline:
        failed = [c for c in current.cells.values() if c.status != "ok"]
        if failed:
            raise PtqbenchError(f"{len(failed)} cell(s) failed ({failed[0].title}: "
                                f"{failed[0].error}); not writing a baseline from them")
        path = write_baseline(current, baseline_path)
        console.print(f"wrote {path} ({len(current.cells)} cells)")
        return 0

    slack = {**slack_from_baseline(base.slack, str(baseline_path)), **slack}
    result = compare(base, current, slack=slack, allow_missing=allow_missing, exact=exact)
    title = f"ptqbench check {base.suite or ''}".rstrip()
    print_rich(result, console, title=title)
    summary_path = summary or (Path(os.environ["GITHUB_STEP_SUMMARY"])
                               if os.environ.get("GITHUB_STEP_SUMMARY") else None)
    if summary_path is not None:
        text = to_markdown(result, title=title, baseline=str(baseline_path))
        summary_path.parent.mkdir(parents=True, exist_ok=True)
        with open(summary_path, "a" if summary is None else "w") as fh:
            fh.write(text)
        if summary is not None:
            console.print(f"wrote {summary_path}", style="dim")
    return 0 if result.passed else 1


def default_baseline(suite: Path) -> Path:
    """``suites/tiny.toml`` -> ``suites/baselines/tiny.json``."""
    return suite.parent / "baselines" / f"{suite.stem}.json"


def _run_and_snapshot(suite: Path, output: Optional[Path], device: Optional[str],
                      threads: Optional[int], no_progress: bool, console):
    """Run the suite (into ``output``, else a temporary folder) and snapshot its cells."""
    import torch

    from ..baseline import snapshot
    from ..pipeline.runner import run_suite
    from ..progress import Reporter
    from ..store import Store

    if threads:
        # CPU kernels may split reductions by thread count: fixed threads, fixed bits
        torch.set_num_threads(int(threads))
    out = Path(output) if output else Path(tempfile.mkdtemp(prefix="ptqbench-check-"))
    try:
        with Reporter(enabled=not no_progress) as reporter:
            summary = run_suite(suite, output=out, reporter=reporter, device=device)
        if summary.other_code:
            console.print(f"warning: {len(summary.other_code)} finished cell(s) in {out} were "
                          f"made by other ptqbench/plugin sources and were kept; use a fresh "
                          f"-o folder to check this code", style="yellow")
        store = Store(summary.output)
        records = [r for r in (store.read_record(c.key) for c in summary.cells) if r is not None]
        return snapshot(records, store, numerics={"torch_threads": torch.get_num_threads()})
    finally:
        if output is None:
            shutil.rmtree(out, ignore_errors=True)
