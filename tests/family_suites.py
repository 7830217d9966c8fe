"""A small suite over one family's tiny instance: fp, rtn and a reconstruction method."""
import json
import textwrap
from pathlib import Path

from click.testing import CliRunner

from ptqbench.cli import cli


def family_suite(tmp_path: Path, folder: Path, plugin: str, options: dict,
                 sampler: str = 'kind = "ddim"\nsteps = 4\nspacing = "uniform"',
                 num_samples: int = 4, methods=("fp", "rtn", "qdiffusion"),
                 bits=("W8A8",)) -> Path:
    opts = ", ".join(f"{k} = {json.dumps(v)}" for k, v in options.items())
    suite = tmp_path / "family.toml"
    suite.write_text(textwrap.dedent(f"""
        [suite]
        name = "family-{plugin}"
        [models.m]
        plugin = "{plugin}"
        path = "{folder}"
        options = {{ {opts} }}
        [samplers.s]
        """) + sampler + textwrap.dedent(f"""
        [grid]
        models = ["m"]
        samplers = ["s"]
        bits = {json.dumps(list(bits))}
        methods = {json.dumps(list(methods))}
        [evaluation]
        num_samples = {num_samples}
        batch_size = {num_samples}
        metrics = ["paired"]
        [methods.rtn]
        preset = "rtn"
        selector_options = {{ steps = 2, per_step = 4 }}
        [methods.qdiffusion]
        preset = "qdiffusion"
        selector_options = {{ steps = 2, per_step = 4 }}
        reconstructor_options = {{ iters_w = 4, iters_a = 2, batch_size = 4 }}
        """))
    return suite


def run_suite(suite: Path, out: Path) -> dict:
    result = CliRunner().invoke(cli, ["run", str(suite), "-o", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    recs = [json.loads(p.read_text()) for p in sorted((out / "records").glob("*.json"))]
    return {(r["cell"]["method"], r["cell"]["bits"]): r for r in recs}
