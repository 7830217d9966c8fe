"""``ptqbench convert-ldm CKPT CONFIG OUT``: a CompVis latent-diffusion checkpoint -> a diffusers
folder for the ``ldm`` / ``ldm-cin`` model plugins (see :mod:`ptqbench.convert_ldm`)."""
from __future__ import annotations

import functools
from pathlib import Path

import click

from .errors import PtqbenchError


def _user_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except PtqbenchError as exc:
            raise click.ClickException(str(exc)) from None
    return wrapper


@click.command("convert-ldm")
@click.argument("ckpt", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("config", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@_user_errors
def convert_ldm_command(ckpt: Path, config: Path, out: Path) -> None:
    """Convert CKPT (CompVis model.ckpt) with its YAML CONFIG into the diffusers folder OUT
    (LSUN-Bedroom LDM-4, LSUN-Church LDM-8, ImageNet cin256-v2)."""
    from .convert_ldm import convert_ldm

    if out.exists() and any(out.iterdir()):
        raise PtqbenchError(f"{out} exists and is not empty; choose a new folder")
    info = convert_ldm(ckpt, config, out)
    plugin = "ldm-cin" if info.get("classes") else "ldm"
    click.echo(f"wrote {out}: {info['unet']} + {info['autoencoder']} (scale_factor "
               f"{info['scale_factor']}); use it with plugin = \"{plugin}\", path = \"{out}\"")
