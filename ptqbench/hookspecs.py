"""pluggy hook specifications: one hook per plugin family, each receiving a ``register`` callback.

A plugin module implements any of them::

    from ptqbench import hookimpl

    @hookimpl
    def register_weightings(register):
        register(MyWeighting)
"""
import pluggy

hookspec = pluggy.HookspecMarker("ptqbench")
hookimpl = pluggy.HookimplMarker("ptqbench")

FAMILIES = ("models", "selectors", "weightings", "reconstructors", "metrics", "executors")


@hookspec
def register_models(register):
    """Register ModelAdapter subclasses."""


@hookspec
def register_selectors(register):
    """Register Selector subclasses."""


@hookspec
def register_weightings(register):
    """Register Weighting subclasses."""


@hookspec
def register_reconstructors(register):
    """Register Reconstructor subclasses."""


@hookspec
def register_metrics(register):
    """Register Metric subclasses."""


@hookspec
def register_executors(register):
    """Register Executor subclasses."""
