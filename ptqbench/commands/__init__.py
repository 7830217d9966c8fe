"""Commands of the ``ptqbench`` CLI that live in modules of their own (the group and the core
commands are in :mod:`ptqbench.cli`). Command modules parse options and print; the work they
start lives in the library (``ptqbench.calib.diagnose``, ``ptqbench.check``, ...)."""
