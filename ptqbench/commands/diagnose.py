"""``ptqbench diagnose``: the command line of :mod:`ptqbench.calib.diagnose` (gradient conflict
across timesteps and GAC's learned weights for one block of one cell)."""
from __future__ import annotations

from pathlib import Path

import click

from ..errors import PtqbenchError


@click.command("diagnose")
@click.option("--suite", type=click.Path(dir_okay=False, path_type=Path),
              help="Suite file (default: the embedded one).")
@click.option("--model", help="Model name in the suite.")
@click.option("--method", help="Method name in the suite (e.g. gac).")
@click.option("--bits", help="Bit-width, e.g. W4A8.")
@click.option("--sampler", help="Sampler name in the suite.")
@click.option("--seed", type=int, help="Seed of the cell.")
@click.option("--block", "block", help="Block to diagnose, e.g. down_blocks.1.resnets.0.")
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the CSV/JSON/PNG outputs.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N.")
@click.option("--iterations", type=int,
              help="Reconstruction iterations of the blocks before it (quick look).")
@click.option("--max-per-step", type=int, default=64, show_default=True,
              help="Calibration samples per timestep for the conflict matrix.")
@click.option("--max-samples", type=int, default=256, show_default=True,
              help="Samples whose gradient alignment is scored against the learned weights.")
@click.option("--list-blocks", is_flag=True, help="Print the model's block names and exit.")
def diagnose(suite, model, method, bits, sampler, seed, block, out, device, iterations,
             max_per_step, max_samples, list_blocks):
    """Gradient conflict across timesteps for one block, and GAC's learned weights.

    Writes gradient_conflict.{csv,json,png}; for a gradient-aligned method also
    gac_weights_by_step.{csv,png}, gac_weights_alignment.png and gac_weights.json.
    """
    if not list_blocks and (block is None or out is None):
        raise click.UsageError("--block and --out are required (or use --list-blocks)")
    from ..calib.diagnose import run_diagnosis

    try:
        res = run_diagnosis(suite, block, out, model, method, bits, sampler, seed, device,
                            iterations, max_per_step, max_samples, list_blocks)
    except PtqbenchError as exc:
        raise click.ClickException(str(exc)) from None
    if list_blocks:
        click.echo(f"{res['cell']}:")
        for name in res["blocks"]:
            click.echo(f"  {name}")
        return
    click.echo(f"{res['cell']}: block {res['block']} ({res.get('phase')})")
    for group in ("conflict", "weights"):
        for kind, path in res.get(group, {}).items():
            click.echo(f"  {group} {kind}: {path}")
    if res.get("gm_share") is not None:
        click.echo(f"  L_GM share of the meta-gradient (|grad_GM| / |grad_MSE|, median over "
                   f"meta steps): {res['gm_share']:.3g} ({res['gm_share_min']:.3g}.."
                   f"{res['gm_share_max']:.3g}), cos(full, MSE only) {res['cos_full_mse']:.3f}")
    if res.get("pearson") is not None:
        click.echo(f"  weight vs gradient alignment: pearson {res['pearson']:.3f}, "
                   f"spearman {res['spearman']:.3f}")
