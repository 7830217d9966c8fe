"""Faults that only show while a cell runs: they fail that cell, with a one-line reason.

A cell's record keeps ``error = {"type", "message", "stage", "detail", "traceback"}``:
``message`` is one line a user can act on (what failed, in which stage, what to change),
``detail`` the exception's own text when it was longer. The kinds recognised here:

- out of memory on the GPU (the message says which batch size to lower, by stage); the memory
  is released so that the next cell starts from a clean device;
- non-finite numbers: an FP model whose weights hold NaN/inf (corrupt weights that still load),
  a reconstruction that left NaN/inf in losses or quantization parameters;
- anything else (a model folder that is not a diffusers model, weights that do not load, a
  plugin that raises): the exception's text, whitespace collapsed to one line.
"""
from __future__ import annotations

import gc
import math
import re
import traceback
from typing import Optional

import torch
from torch import nn

#: longest one-line reason kept in ``error.message`` (the full text is in ``error.detail``)
MAX_MESSAGE = 400

#: what to lower after an out-of-memory error, by the stage it happened in
OOM_ADVICE = {
    "load": "the model does not fit on this device",
    "trajectories": "lower the method's calibration_batch_size (default: evaluation.batch_size)",
    "select": "lower the selector's sample counts (selector_options)",
    "quantize": "lower the method's calibration_batch_size (default: evaluation.batch_size)",
    "reconstruct": "lower reconstructor_options batch_size / forward_batch_size, or set "
                   "cache_on_device = false",
    "sample": "lower evaluation.batch_size",
    "sample_fp": "lower evaluation.batch_size",
    "metrics": "lower the metric's batch_size option (evaluation.metric_options)",
}


class NonFiniteError(RuntimeError):
    """NaN or inf where numbers must be finite (model weights, reconstruction results)."""


def tag_stage(exc: BaseException, stage: str) -> None:
    """Remember the innermost pipeline stage an exception passed through."""
    if getattr(exc, "ptqbench_stage", None) is None:
        try:
            exc.ptqbench_stage = stage
        except (AttributeError, TypeError):  # exceptions with __slots__
            pass


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("CUDA out of memory" in text
                                              or "CUBLAS_STATUS_ALLOC_FAILED" in text)


def one_line(text: str, limit: int = MAX_MESSAGE) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def describe(exc: BaseException, device: Optional[torch.device] = None) -> dict:
    """The ``error`` entry of a failed cell's record."""
    stage = getattr(exc, "ptqbench_stage", None)
    text = str(exc)
    if is_out_of_memory(exc):
        asked = re.search(r"Tried to allocate ([\d.]+ \w+)", text)
        where = f" on {device}" if device is not None else ""
        during = f" during {stage}" if stage else ""
        message = (f"out of memory{where}{during}"
                   + (f" (tried to allocate {asked.group(1)})" if asked else "")
                   + f"; {OOM_ADVICE.get(stage, 'lower the batch sizes of the suite')}")
        kind = "OutOfMemory"
    else:
        message = one_line(text) or type(exc).__name__
        if stage:
            message = f"{message} (stage {stage})"
        kind = type(exc).__name__
    out = {"type": kind, "message": message, "stage": stage,
           "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))}
    if one_line(text, 10**9) != message:
        out["detail"] = text
    return out


def release_memory(device: torch.device) -> None:
    """After a failed cell: drop what its frames held, give the GPU's cached blocks back."""
    gc.collect()
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()


def nonfinite_tensors(module: nn.Module, limit: int = 5) -> list[str]:
    """Names of floating-point parameters and buffers of ``module`` holding NaN or inf."""
    bad = []
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad.append(name)
            if len(bad) >= limit:
                break
    return bad


def check_model_finite(model: nn.Module, what: str) -> None:
    bad = nonfinite_tensors(model, limit=10**9)
    if bad:
        raise NonFiniteError(f"{what} hold NaN/inf in {_names(bad, 'tensor')} (corrupt weights?)")


def check_reconstruction_finite(qmodel: nn.Module, recon: Optional[dict]) -> None:
    """Fail the cell when reconstruction produced NaN/inf: in a block's losses or errors, or in
    the quantized model's parameters (a learning rate too high, a weighting gone wrong)."""
    blocks = []
    for entry in (recon or {}).get("blocks", []):
        values = [entry.get("mse_after")]
        values += [v for phase in entry.get("phases", []) for _, v in phase.get("loss", [])]
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            blocks.append(entry.get("name", "?"))
    tensors = nonfinite_tensors(qmodel, limit=10**9)
    if blocks or tensors:
        where = [f"losses of {_names(blocks, 'block')}"] if blocks else []
        where += [f"{_names(tensors, 'tensor')} of the quantized model"] if tensors else []
        raise NonFiniteError(f"reconstruction produced NaN/inf ({'; '.join(where)}); try lower "
                             f"learning rates (reconstructor_options lr_w / lr_a) or check the "
                             f"weighting")


def _names(names: list[str], what: str, show: int = 2) -> str:
    more = f" and {len(names) - show} more" if len(names) > show else ""
    return f"{len(names)} {what}{'s' if len(names) > 1 else ''} ({', '.join(names[:show])}{more})"
