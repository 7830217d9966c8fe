"""``ptqbench check`` end to end on the bundled tiny model: a deterministic CPU rerun reproduces
the baseline bit for bit, and a deliberately broken quantizer fails the check."""
import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from ptqbench.cli import cli
from ptqbench.reproducible import comparable
from ptqbench.store import Store

from test_end_to_end import records, small_tiny_suite

# the tiny suite with fewer samples and a smaller calibration set and range search: fast
FAST = """
    [methods.rtn]
    preset = "rtn"
    selector_options = { steps = 2, per_step = 4 }
    recipe = { mse_grid = 20 }
"""

BROKEN_QUANTIZER = '''
import torch

from ptqbench import Reconstructor, hookimpl
from ptqbench.quant.model import fold_weights, quant_layers


class BrokenRTN(Reconstructor):
    name = "broken-rtn"
    description = "RTN that adds noise of one quantization step to every weight: a regression"

    def reconstruct(self, fp_model, qmodel, adapter, calib, val, weighting, context):
        g = torch.Generator().manual_seed(0)
        for _, layer in quant_layers(qmodel):
            for wq in layer.weight_quantizers or []:
                noise = torch.randn(wq.weight.shape, generator=g).to(wq.weight.device)
                wq.weight.add_(noise * wq.scale)
        return {"reconstructor": self.name, "blocks": [],
                "folded_weight_quantizers": fold_weights(qmodel)}


@hookimpl
def register_reconstructors(register):
    register(BrokenRTN)
'''


def check(*args):
    return CliRunner().invoke(cli, ["check", *map(str, args), "--no-progress"])


@pytest.fixture(scope="module")
def baseline_run(tmp_path_factory):
    """The fast tiny suite run once, and the baseline written from it."""
    tmp = tmp_path_factory.mktemp("baseline")
    suite = small_tiny_suite(tmp, FAST, num_samples=16)
    out, baseline = tmp / "out", tmp / "baselines" / "small.json"
    result = check(suite, "-o", out, "--baseline", baseline, "--update-baseline")
    assert result.exit_code == 0, result.output
    assert f"wrote {baseline} (3 cells)" in " ".join(result.output.split()).replace(
        f"{baseline.parent}/ ", f"{baseline.parent}/")  # rich wraps long lines
    return out, baseline


def test_a_rerun_reproduces_the_baseline_bit_for_bit(baseline_run, tmp_path, tiny_model_dir):
    first, baseline = baseline_run
    suite = small_tiny_suite(tmp_path, FAST, num_samples=16)
    again, summary = tmp_path / "again", tmp_path / "summary.md"
    result = check(suite, "-o", again, "--baseline", baseline, "--exact", "--summary", summary)
    assert result.exit_code == 0, result.output
    assert "PASSED: 3 cells compared, 3 identical to the baseline" in result.output
    # the records themselves: every compared field equal, the samples equal byte for byte
    a = {r["key"]: r for r in records(first)}
    b = {r["key"]: r for r in records(again)}
    assert set(a) == set(b) and len(a) == 3
    for key in a:
        assert comparable(a[key]) == comparable(b[key])
        n = a[key]["num_samples"]
        assert np.array_equal(Store(first).load_samples(a[key]["gen_key"], n),
                              Store(again).load_samples(b[key]["gen_key"], n))
    assert a[key]["started"] != b[key]["started"] or a[key]["costs"] != b[key]["costs"]
    assert "passed" in summary.read_text()
    # a results folder is checked as it is, without running anything
    assert check(first, "--baseline", baseline, "--exact").exit_code == 0


def test_a_broken_quantizer_fails_the_check(baseline_run, tmp_path, tiny_model_dir):
    first, baseline = baseline_run
    # the FP cell is unchanged (same key): reuse it, run only the two broken rtn cells
    out = tmp_path / "broken"
    shutil.copytree(first, out)
    (tmp_path / "broken_rtn.py").write_text(BROKEN_QUANTIZER)
    suite = small_tiny_suite(tmp_path, FAST + 'reconstructor = "broken-rtn"\n', num_samples=16,
                             plugins=("broken_rtn.py",))
    summary = tmp_path / "summary.md"
    result = check(suite, "-o", out, "--baseline", baseline, "--summary", summary)
    assert result.exit_code == 1, result.output
    assert "FAILED" in result.output and "regressed" in result.output
    assert result.output.count("config changed") == 2  # same cells, other configuration
    text = summary.read_text()
    assert "**FAILED**" in text and "### Regressions" in text
    regressed = [ln for ln in text.split("### Cells")[0].splitlines() if "| paired_mse |" in ln]
    assert {ln.split("|")[1].strip() for ln in regressed} == {
        "tiny-mnist/ddim20 W4A8 rtn seed 0", "tiny-mnist/ddim20 W8A8 rtn seed 0"}
    # the same run passes when the slack allows it (here: anything up to 10x worse)
    loose = check(out, "--baseline", baseline, "--slack", "paired_mse=1000%",
                  "--slack", "paired_psnr=1000%")
    assert loose.exit_code == 0, loose.output
    recs = {r["cell"]["bits"]: r for r in records(out) if r["cell"]["method"] == "rtn"
            and r["plugins"]["reconstructor"]["name"] == "broken-rtn"}
    assert set(recs) == {"W8A8", "W4A8"}
    base = {(c["cell"]["bits"]): c for c in json.loads(baseline.read_text())["cells"]}
    for bits, rec in recs.items():  # the broken quantizer is really worse
        assert rec["metrics"]["paired_mse"]["value"] > base[bits]["metrics"]["paired_mse"]["value"]
