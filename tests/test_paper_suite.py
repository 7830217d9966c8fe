"""suites/paper.toml: per-setting files, per-model samplers/evaluation/method overrides, and a
dry run that validates offline and says what is local and what must be downloaded."""
import textwrap
from pathlib import Path

from click.testing import CliRunner

from ptqbench.cli import cli
from ptqbench.pipeline.runner import prepare

SUITES = Path(__file__).resolve().parents[1] / "suites"


def test_paper_grid_cells_follow_each_setting():
    loaded, _, cells = prepare(SUITES / "paper.toml")
    by_model = {}
    for c in cells:
        by_model.setdefault(c.model, set()).add(c.sampler)
    assert by_model == {"cifar10": {"ddim100-quad"}, "lsun-bedroom": {"ddim200-eta1"},
                        "lsun-church": {"ddim400"}, "imagenet-ldm4": {"ddim20-cfg"},
                        "sd-v1-4": {"plms50"}, "dit-xl2": {"ddpm50", "ddpm100", "ddpm250"}}
    # 8 (model, sampler) pairs x (1 fp + 5 methods x 3 bit-widths)
    assert len(cells) == 8 * (1 + 5 * 3)
    sd = next(c for c in cells if c.model == "sd-v1-4" and c.method == "qdiffusion")
    assert sd.evaluation.num_samples == 10000 and "clip-score" in sd.evaluation.metrics
    assert sd.resolved.selector_options["per_step"] == 128  # the setting's own calibration size
    bed = next(c for c in cells if c.model == "lsun-bedroom" and c.method == "qdiffusion")
    assert bed.resolved.selector_options["per_step"] == 256
    assert bed.evaluation.metric_options["fid"]["reference"].endswith("VIRTUAL_lsun_bedroom256.npz")
    assert bed.evaluation.num_samples == 50000


def test_paper_dry_run_offline_reports_local_and_downloads():
    result = CliRunner().invoke(cli, ["run", str(SUITES / "paper.toml"), "--dry-run",
                                      "--model", "lsun-bedroom", "--bits", "W4A8"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "6 cells" in out  # fp + 5 methods at W4A8
    assert "model lsun-bedroom (ldm)" in out and "[missing]" in out
    assert "ptqbench convert-ldm" in out and "VIRTUAL_lsun_bedroom256.npz" in out
    full = CliRunner().invoke(cli, ["run", str(SUITES / "paper.toml"), "--dry-run"]).output
    assert "facebook/DiT-XL-2-256  [hub" in full and "google/ddpm-cifar10-32  [hub" in full


def test_stand_in_suite_is_local_when_the_shared_data_is(shared_data):
    result = CliRunner().invoke(cli, ["run", str(SUITES / "cifar10-dit-s.toml"), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "cifar10-dit-s  [local]" in result.output and "27 cells" in result.output


def test_model_overrides_are_validated(tmp_path):
    suite = tmp_path / "s.toml"
    suite.write_text(textwrap.dedent("""
        [models.a]
        path = "builtin:tiny-mnist"
        samplers = ["nope"]
        [samplers.s]
        steps = 2
        [grid]
        models = ["a"]
        samplers = ["s"]
        methods = ["fp"]
    """))
    result = CliRunner().invoke(cli, ["run", str(suite), "--dry-run"])
    assert result.exit_code != 0 and "models.a.samplers[0]" in result.output
    suite.write_text(suite.read_text().replace('samplers = ["nope"]', "download = \"x\"")
                     .replace('path = "builtin:tiny-mnist"', 'path = "./absent"')
                     + '[models.a.evaluation]\nmetrics = ["fid"]\n')
    result = CliRunner().invoke(cli, ["run", str(suite), "--dry-run"])
    assert result.exit_code != 0
    assert "evaluation.metric_options.fid" in result.output and "reference" in result.output
