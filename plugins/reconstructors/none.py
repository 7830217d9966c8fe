"""``none``: round-to-nearest (RTN) - no reconstruction; weights are folded into integer codes."""
from __future__ import annotations

import time

from ptqbench import Reconstructor, hookimpl
from ptqbench.errors import PtqbenchError
from ptqbench.quant.model import fold_weights


class NoReconstruction(Reconstructor):
    name = "none"
    description = "Round-to-nearest (RTN): keep the initialised ranges, fold weights to integers"

    def __init__(self, **options):
        if options:
            raise PtqbenchError(f"reconstructor 'none' takes no options, got: "
                                f"{', '.join(sorted(options))}")
        super().__init__()

    def reconstruct(self, fp_model, qmodel, adapter, calib, val, weighting, context) -> dict:
        t0 = time.perf_counter()
        folded = fold_weights(qmodel)
        return {"reconstructor": self.name, "folded_weight_quantizers": folded,
                "blocks": [], "seconds": time.perf_counter() - t0}


@hookimpl
def register_reconstructors(register):
    register(NoReconstruction)
