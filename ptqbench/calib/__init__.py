"""Calibration data: which (x_t, t) the quantized model is calibrated on, and how much each counts.

- :mod:`.trajectories`  the FP trajectory store (record once, content-hashed, memory-mapped)
- :mod:`.selection`     the selector base class: budgets, validation sets
- :mod:`.tdac`          EDA-DM's density/diversity step scores and sample allocation
- :mod:`.gac`           the bilevel math of gradient-aligned calibration (GAC)
- :mod:`.diagnostics`   gradient conflict across timesteps, learned-weight analysis, probe
- :mod:`.diagnose`      one block's diagnosis inside a cell's real run (``ptqbench diagnose``)
- :mod:`.testing`       tiny deterministic blocks and models for tests

The plugins themselves live in ``plugins/selectors`` and ``plugins/weightings``.
"""
