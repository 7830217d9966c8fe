"""The ``ptqbench`` command."""
from __future__ import annotations

import functools
import sys
from pathlib import Path

import click
from rich.console import Console

from .errors import PtqbenchError


def user_errors(fn):
    """Turn a PtqbenchError into a one-line message and exit code 2 — no traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except PtqbenchError as exc:
            raise click.ClickException(str(exc)) from None

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ptqbench")
def cli():
    """Benchmark post-training quantization of diffusion models.

    A suite (TOML) declares models, samplers, bit-widths, methods and seeds; `ptqbench run`
    expands it to cells, runs each (calibrate, quantize, reconstruct, sample, score) and writes
    one JSON record per cell; `ptqbench report` turns records into a leaderboard.
    """


@cli.command()
@click.argument("suite", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--dry-run", is_flag=True, help="Validate the suite and print its cells; run nothing.")
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path),
              help="Results folder (default: the suite's [suite].output).")
@click.option("--device", help="Device for the local executor: auto, cpu, cuda, cuda:N.")
@click.option("--retry-failed/--skip-failed", default=True, show_default=True,
              help="Rerun cells whose record says failed (finished cells are always skipped).")
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
@click.option("--model", "models", multiple=True, help="Only cells of this model (repeatable).")
@click.option("--bits", "bits", multiple=True, help="Only this bit-width, e.g. W4A8 (repeatable).")
@click.option("--method", "methods", multiple=True, help="Only this method (repeatable).")
@click.option("--cell", "keys", multiple=True,
              help="Only the cell whose key starts with this (repeatable; keys: --dry-run).")
@user_errors
def run(suite, dry_run, output, device, retry_failed, no_progress, models, bits, methods, keys):
    """Run SUITE (default: the embedded tiny suite, offline on a CPU in a few minutes).

    Rerunning a suite skips the cells that already have a record, and resumes sampling and
    reconstruction of an interrupted cell where they stopped. --model/--bits/--method/--cell
    run part of a suite (filters combine; FP cells that the chosen cells are paired with are
    always included).
    """
    select = {"models": models, "bits": bits, "methods": methods, "keys": keys}
    select = select if any(select.values()) else None
    from .pipeline.runner import prepare, run_suite
    from .progress import Reporter
    from .report import leaderboard, load_records, print_rich, records_frame
    from .store import Store

    console = Console()
    if dry_run:
        loaded, _, cells = prepare(suite)
        if select:
            from .pipeline.runner import select_cells
            cells = select_cells(cells, **select)
        out = Path(output or loaded.suite.suite.output)
        store = Store(out)
        from .environment import code_identity
        from .pipeline.runner import made_by_other_code
        code = code_identity()
        click.echo(f"suite {loaded.suite.suite.name} ({loaded.file}): {len(cells)} cells -> {out}")
        for cell in cells:
            rec = store.read_record(cell.key)
            state = "new" if rec is None else rec.get("status", "?")
            if rec is not None and made_by_other_code(rec, code):
                state += ", other code"
            click.echo(f"  {cell.key}  {cell.title()}  [{state}]")
        return
    with Reporter(enabled=not no_progress) as reporter:
        summary = run_suite(suite, output=output, reporter=reporter, rerun_failed=retry_failed,
                            device=device, select=select)
    console.print(f"{len(summary.cells)} cells: {len(summary.ok)} ran, {len(summary.skipped)} "
                  f"already finished, {len(summary.failed)} failed -> {summary.output}")
    if summary.other_code:
        keys = ", ".join(c.key for c in summary.other_code[:4])
        more = f" and {len(summary.other_code) - 4} more" if len(summary.other_code) > 4 else ""
        console.print(f"warning: {len(summary.other_code)} finished cells ({keys}{more}) were "
                      f"produced by other ptqbench/plugin sources (their records' 'code' "
                      f"differs); their results were kept. To recompute them with this code, "
                      f"run into a fresh output folder (-o).", style="yellow")
    df = records_frame(load_records(summary.output))
    board = leaderboard(df)
    if not board.empty:
        print_rich(board, console)
    if summary.failed:
        sys.exit(1)


@cli.command()
@click.argument("folder", required=False, default="results/tiny",
                type=click.Path(file_okay=False, path_type=Path))
@click.option("--model", "models", multiple=True, help="Only this model (repeatable).")
@click.option("--bits", "bits", multiple=True, help="Only this bit-width, e.g. W4A8 (repeatable).")
@click.option("--method", "methods", multiple=True, help="Only this method (repeatable).")
@click.option("--sort", help="Metric to rank by (default: fid, fid_to_fp, sfid, paired_mse).")
@click.option("--format", "fmt", type=click.Choice(["terminal", "markdown", "csv"]),
              default="terminal", show_default=True)
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Write to this file instead of standard output.")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path),
              help="Also save a PNG bar chart of the sort metric by method and bit-width.")
@user_errors
def report(folder, models, bits, methods, sort, fmt, output, plot):
    """Leaderboard of the records in FOLDER (a suite's output folder).

    One row per (model, sampler, bits, method); FP rows are the reference; ± is the half-width
    of the 95% confidence interval and ≈ marks rows not significantly different from the best.
    """
    from .report import (failed_cells, leaderboard, load_records, print_rich, records_frame,
                         to_csv, to_markdown)

    df = records_frame(load_records(folder))
    board = leaderboard(df, models=models, bits=bits, methods=methods, sort=sort)
    if board.empty:
        raise PtqbenchError("no finished cells match the filters")
    if plot is not None:
        from .report import SORT_PREFERENCE, metric_names, plot_metric

        metric = sort or next((m for m in SORT_PREFERENCE if m in metric_names(board)), None)
        click.echo(f"wrote {plot_metric(board, metric, plot)}", err=True)
    if fmt == "terminal" and output is None:
        console = Console()
        print_rich(board, console)
        failed = failed_cells(df)
        if not failed.empty:
            console.print(f"[red]{len(failed)} failed cell(s)[/red]:")
            for _, r in failed.iterrows():
                console.print(f"  {r['model']} {r['bits']} {r['method']} seed {r['seed']}: {r['error']}",
                              highlight=False)
        return
    text = to_csv(board) if fmt == "csv" else to_markdown(board)
    if fmt == "terminal":
        text = to_markdown(board)
    if output is None:
        click.echo(text, nl=False)
    else:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text)
        click.echo(f"wrote {output}")


@cli.command()
@click.option("--suite", type=click.Path(dir_okay=False, path_type=Path),
              help="Also load the local plugin files this suite names.")
@click.option("--plain", is_flag=True, help="Tab-separated lines instead of a table (for scripts).")
@user_errors
def plugins(suite, plain):
    """List every registered plugin: family, name, where it came from, what it does."""
    from rich.table import Table

    from .registry import default_registry
    from .suite.loader import load_suite

    registry = default_registry()
    if suite is not None:
        for f in load_suite(suite).plugin_files:
            registry.load_file(f)
    if plain:
        for info in registry.all():
            click.echo("\t".join((info.family, info.name, info.source, info.description)))
        return
    table = Table(title="ptqbench plugins")
    for col in ("family", "name", "source", "description"):
        table.add_column(col)
    for info in registry.all():
        table.add_row(info.family, info.name, info.source, info.description)
    Console(width=max(Console().width, 160)).print(table)


def _add_commands() -> None:
    """Commands that live in modules of their own (ptqbench/commands/)."""
    from .commands.check import check
    from .commands.diagnose import diagnose

    cli.add_command(check)
    cli.add_command(diagnose)


_add_commands()


def main():
    cli(prog_name="ptqbench")


if __name__ == "__main__":
    main()
