"""Faults that only show at run time fail only their cell, with a one-line reason in the record,
in the terminal and in `ptqbench report`: corrupt weights, a config that is not a diffusers
model, NaN weights, an out-of-memory error, NaNs in reconstruction."""
import json
import shutil
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from ptqbench.cli import cli
from ptqbench.pipeline.cell import StageTimer
from ptqbench.pipeline.faults import check_reconstruction_finite, describe

WEIGHTS = "unet/diffusion_pytorch_model.safetensors"

FAULTY_PLUGIN = '''
import torch
from ptqbench import Weighting, hookimpl


class OutOfMemory(Weighting):
    name = "oom"
    description = "raises CUDA's out-of-memory error, as a GPU that is too small would"

    def prepare(self, calib, val, context):
        raise torch.cuda.OutOfMemoryError(
            "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of "
            "79.10 GiB of which 1.20 GiB is free.\\nOf the allocated memory 70 GiB is reserved")

    def weights(self, idx):
        return None


class NanWeights(Weighting):
    name = "nan-weights"
    description = "NaN per-sample weights: every reconstruction loss becomes NaN"

    def weights(self, idx):
        return torch.full((len(idx),), float("nan"))


@hookimpl
def register_weightings(register):
    register(OutOfMemory)
    register(NanWeights)
'''


def records(out: Path) -> dict:
    recs = [json.loads(p.read_text()) for p in (out / "records").glob("*.json")]
    return {(r["cell"]["model"], r["cell"]["method"]): r for r in recs}


def suite(tmp_path: Path, models: dict, methods: list, extra: str = "") -> Path:
    text = "[suite]\nname = \"faults\"\nplugins = [\"faulty.py\"]\n"
    for name, path in models.items():
        text += f"[models.{name}]\npath = \"{path}\"\n"
    text += textwrap.dedent(f"""
        [samplers.s]
        steps = 2
        [grid]
        models = {list(models)!r}
        samplers = ["s"]
        bits = ["W8A8"]
        methods = {methods!r}
        [evaluation]
        num_samples = 4
        batch_size = 4
    """) + textwrap.dedent(extra)
    (tmp_path / "faulty.py").write_text(FAULTY_PLUGIN)
    path = tmp_path / "suite.toml"
    path.write_text(text)
    return path


def test_broken_model_folders_fail_only_their_cells(tmp_path, tiny_model_dir):
    corrupt = shutil.copytree(tiny_model_dir, tmp_path / "corrupt")
    (corrupt / WEIGHTS).write_bytes(b"\x93NOT SAFETENSORS" * 20)
    foreign = shutil.copytree(tiny_model_dir, tmp_path / "foreign")
    (foreign / "unet" / "config.json").write_text('{"hello": "world"}')  # not a diffusers config
    nans = shutil.copytree(tiny_model_dir, tmp_path / "nans")
    state = load_file(nans / WEIGHTS)
    state["conv_in.weight"][0, 0, 0, 0] = float("nan")
    save_file(state, nans / WEIGHTS)
    path = suite(tmp_path, {"good": "builtin:tiny-mnist", "corrupt": "./corrupt",
                            "foreign": "./foreign", "nans": "./nans"}, ["fp"])
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["run", str(path), "-o", str(out), "--no-progress"])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    recs = records(out)
    assert recs[("good", "fp")]["status"] == "ok"
    errors = {m: recs[(m, "fp")]["error"] for m in ("corrupt", "foreign", "nans")}
    for model, err in errors.items():
        assert recs[(model, "fp")]["status"] == "failed"
        assert "\n" not in err["message"] and err["stage"] == "load"
        assert err["traceback"].startswith("Traceback")  # the whole story stays in the record
    assert "Unable to load weights" in errors["corrupt"]["message"]
    assert "size mismatch" in errors["foreign"]["message"]  # config and weights disagree
    assert errors["foreign"]["detail"].count("\n") > 1  # the full text is kept beside it
    assert errors["nans"]["message"] == ("the weights of model 'nans' hold NaN/inf in 1 tensor "
                                         "(conv_in.weight) (corrupt weights?) (stage load)")
    # the terminal says it in one line per cell; report lists failed cells with their reasons
    assert "failed nans | s | FP | fp | seed 0: NonFiniteError: the weights of model" in \
        " ".join(result.output.split())
    report = CliRunner().invoke(cli, ["report", str(out)])
    assert report.exit_code == 0, report.output
    text = " ".join(report.output.split())
    assert "3 failed cell(s)" in text
    assert "nans | s | FP | fp | seed 0: the weights of model 'nans' hold NaN/inf" in text


def test_out_of_memory_and_nan_reconstruction_fail_only_their_cells(tmp_path):
    fast = 'selector_options = { steps = 2, per_step = 4 }\n' \
           'recipe = { weight_init = "minmax", act_init = "minmax" }\n'
    path = suite(tmp_path, {"m": "builtin:tiny-mnist"}, ["fp", "oom", "nan", "rtn"], f"""
        [methods.oom]
        preset = "rtn"
        weighting = "oom"
        {fast}
        [methods.nan]
        preset = "brecq"
        weighting = "nan-weights"
        reconstructor_options = {{ iters_w = 2, iters_a = 2 }}
        {fast}
        [methods.rtn]
        preset = "rtn"
        {fast}
    """)
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["run", str(path), "-o", str(out), "--no-progress"])
    assert result.exit_code == 1, result.output
    recs = records(out)
    assert recs[("m", "fp")]["status"] == "ok" and recs[("m", "rtn")]["status"] == "ok"
    oom = recs[("m", "oom")]["error"]
    assert oom["type"] == "OutOfMemory" and oom["stage"] == "reconstruct"
    assert oom["message"] == ("out of memory on cpu during reconstruct (tried to allocate "
                              "2.00 GiB); lower reconstructor_options batch_size / "
                              "forward_batch_size, or set cache_on_device = false")
    nan = recs[("m", "nan")]["error"]
    assert nan["type"] == "NonFiniteError" and "\n" not in nan["message"]
    assert nan["message"].startswith("reconstruction produced NaN/inf (losses of ")
    assert "failed m | s | W8A8 | oom | seed 0: OutOfMemory: out of memory on cpu" in \
        " ".join(result.output.split())


def test_out_of_memory_message_names_the_stage_and_what_to_lower():
    timer = StageTimer(torch.device("cpu"))
    with pytest.raises(torch.cuda.OutOfMemoryError) as info:
        with timer.stage("sample"):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.50 GiB. "
                                              "GPU 0 has a total capacity of 79.10 GiB")
    err = describe(info.value, torch.device("cuda:0"))
    assert err["message"] == ("out of memory on cuda:0 during sample (tried to allocate 3.50 GiB); "
                              "lower evaluation.batch_size")
    assert err["stage"] == "sample" and "detail" in err


def test_nonfinite_reconstruction_is_found_in_losses_or_parameters():
    model = torch.nn.Linear(2, 2)
    check_reconstruction_finite(model, {"blocks": [{"name": "b0", "mse_after": 0.1,
                                                    "phases": [{"loss": [[0, 1.0]]}]}]})
    with pytest.raises(RuntimeError, match=r"losses of 1 block \(b1\)"):
        check_reconstruction_finite(model, {"blocks": [
            {"name": "b0", "mse_after": 0.1}, {"name": "b1", "phases": [{"loss": [[9, float("nan")]]}]}]})
    with torch.no_grad():
        model.bias[1] = float("inf")
    with pytest.raises(RuntimeError, match=r"1 tensor \(bias\) of the quantized model"):
        check_reconstruction_finite(model, None)
