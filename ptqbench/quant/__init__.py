"""Quantizer core: fake-quant wrappers, range initialisation, AdaRound/LSQ, block reconstruction.

API used by the pipeline::

    from ptqbench.quant import (QuantRecipe, quantize_model, calibrate_activation_ranges,
                                save_quantized, load_quantized)
    from ptqbench.quant.context import sampler_step

    recipe = QuantRecipe.from_options(bits="W4A8", **recipe_options)  # bad option -> PtqbenchError
    qmodel, manifest = quantize_model(fp_model, recipe, adapter)  # deep copy; weight ranges set
    calibrate_activation_ranges(qmodel, adapter, calib, batch_size, device)  # activation ranges
    with sampler_step(k):            # int or LongTensor (N,); selects per-step activation params
        eps = adapter.denoise(qmodel, x, t)
    save_quantized(qmodel, path)
    qmodel2 = load_quantized(fp_model, recipe, adapter, path)  # reproduces outputs exactly

Reconstruction (plugins ``none``, ``adaround``, ``brecq``, ``fbr``) runs
:func:`ptqbench.quant.reconstruction.reconstruct_blocks` on the adapter's blocks (or on every layer
for ``adaround``) and finally folds every weight into integer codes. Recipe options:
``QuantRecipe.option_names()`` / ``ptqbench.quant.recipe.OPTION_DOCS``; reconstructor options:
``ptqbench.quant.recon_options.SOURCES`` (defaults and where they come from).

Per-step activation parameters (``act_params="per_step"``) need ``sampler_steps`` (the sampler's
step count) in the recipe: parameters are created at construction, never lazily.

Modules: quantizer (grids, range init), weight (WeightQuantizer: rtn/adaround/folded forms),
lsq (ActQuantizer), adaround (rectified sigmoid, regulariser, beta schedule), modules
(QuantLayer), attention (QuantAttnProcessor), recipe, manifest, model (quantize_model,
calibration), observer (activation statistics), checkpoint (save/load), block_cache (inputs and
targets of each block without re-running the network prefix), recon_options, reconstruction
(the loop: eager or one CUDA graph per phase), testing (tiny random UNets for tests/benchmarks),
fast (the sampling path: folded inference copy, compile, CUDA graphs, numerics settings), int8
(real int8 execution of quantized layers).
"""
from .bits import BitWidths, parse_bits
from .checkpoint import load_quantized, save_quantized
from .context import sampler_step
from .model import calibrate_activation_ranges, quantize_model
from .recipe import QuantRecipe

__all__ = ["BitWidths", "parse_bits", "QuantRecipe", "quantize_model",
           "calibrate_activation_ranges", "save_quantized", "load_quantized", "sampler_step"]
