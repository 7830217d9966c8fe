"""The ``ptqbench`` command."""
from __future__ import annotations

import functools
import sys
from pathlib import Path

import click
from rich.console import Console

from .cli_errors import GuardedGroup
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


@click.group(cls=GuardedGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ptqbench")
@click.option("--debug", is_flag=True, envvar="PTQBENCH_DEBUG",
              help="Show the full traceback of an unexpected error (default: a short message and "
                   "the path of a log file that holds it).")
def cli(debug):
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
@click.option("--deterministic/--nondeterministic", default=None,
              help="Override the suite's [run] deterministic: bit-identical records on rerun "
                   "(seeded generators, deterministic algorithms; slower on the GPU).")
@user_errors
def run(suite, dry_run, output, device, retry_failed, no_progress, models, bits, methods, keys,
        deterministic):
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
        loaded, _, cells = prepare(suite, output=output)
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
        from .assets import suite_assets
        assets = suite_assets(loaded, cells)
        if assets:
            click.echo("models and files (checked offline):")
            for asset in assets:
                click.echo(asset.line())
        return
    with Reporter(enabled=not no_progress) as reporter:
        summary = run_suite(suite, output=output, reporter=reporter, rerun_failed=retry_failed,
                            device=device, select=select, deterministic=deterministic)
    submitted = f", {len(summary.submitted)} submitted" if summary.submitted else ""
    console.print(f"{len(summary.cells)} cells: {len(summary.ok)} ran, {len(summary.skipped)} "
                  f"already finished, {len(summary.failed)} failed{submitted} -> {summary.output}")
    if summary.submitted:
        console.print(f"follow them with: ptqbench status {summary.output}")
    if summary.other_code:
        keys = ", ".join(c.key for c in summary.other_code[:4])
        more = f" and {len(summary.other_code) - 4} more" if len(summary.other_code) > 4 else ""
        console.print(f"warning: {len(summary.other_code)} finished cells ({keys}{more}) were "
                      f"produced by other ptqbench/plugin sources (their records' 'code' "
                      f"differs); their results were kept. To recompute them with this code, "
                      f"run into a fresh output folder (-o).", style="yellow")
    if summary.submitted and not (summary.ok or summary.skipped or summary.failed):
        return  # nothing finished yet: no leaderboard
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
@click.option("--metrics", "metric_list",
              help="Metric columns to show, in this order, e.g. fid,fid_to_fp,paired_mse "
                   "(default: all, the one ranked by first).")
@click.option("--format", "fmt", type=click.Choice(["terminal", "markdown", "csv", "html"]),
              default="terminal", show_default=True,
              help="html: one self-contained page with plots (needs -o).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Write to this file instead of standard output.")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path),
              help="Also save a PNG bar chart of the sort metric by method and bit-width.")
@user_errors
def report(folder, models, bits, methods, sort, metric_list, fmt, output, plot):
    """Leaderboard of the records in FOLDER (a suite's output folder).

    One row per (model, sampler, bits, method); FP rows are the reference; ± is the half-width
    of the 95% confidence interval, ★ marks the best row of each bit-width and ≈ the rows not
    significantly different from it.
    """
    from .report import (failed_cell_lines, leaderboard, load_records, print_rich,
                         records_frame, shown_metrics, to_csv, to_markdown)

    records = load_records(folder)
    df = records_frame(records)
    board = leaderboard(df, models=models, bits=bits, methods=methods, sort=sort)
    failed = failed_cell_lines(df, models=models, bits=bits, methods=methods)

    def show_failed(console: Console) -> None:
        if failed:
            console.print(f"[red]{len(failed)} failed cell(s)[/red]:")
            for line in failed:
                console.print(f"  {line}", highlight=False, markup=False)

    if board.empty:
        show_failed(Console(stderr=True))
        raise PtqbenchError("no finished cells match the filters")
    chosen = shown_metrics(board, metric_list.split(",")) if metric_list else None
    if chosen and not sort:  # rank by the first metric the reader asked for
        board = leaderboard(df, models=models, bits=bits, methods=methods, sort=chosen[0])
    if plot is not None:
        from .report import SORT_PREFERENCE, metric_names, plot_metric

        metric = sort or next((m for m in SORT_PREFERENCE if m in metric_names(board)), None)
        click.echo(f"wrote {plot_metric(board, metric, plot)}", err=True)
    if fmt == "html":
        if output is None:
            raise PtqbenchError("--format html writes a file: give it with -o, e.g. -o report.html")
        from .reporting.html import write_html_report

        click.echo(f"wrote {write_html_report(board, records, output, metrics=chosen, source=folder)}")
        return
    if fmt == "terminal" and output is None:
        console = Console()
        print_rich(board, console, metrics=chosen)
        show_failed(console)
        return
    show_failed(Console(stderr=True))  # the file or pipe gets the leaderboard alone
    text = to_csv(board, chosen) if fmt == "csv" else to_markdown(board, chosen)
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

    from .pipeline.runner import prepare
    from .registry import default_registry

    registry = default_registry()
    if suite is not None:
        prepare(suite, registry)  # loads its plugin files, after the checks that run does
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


def _add_status() -> None:
    from .status import status

    cli.add_command(status)


def _add_convert_ldm() -> None:
    from .convert_cli import convert_ldm_command

    cli.add_command(convert_ldm_command)


_add_status()
_add_convert_ldm()


def main():
    cli(prog_name="ptqbench")


if __name__ == "__main__":
    main()
