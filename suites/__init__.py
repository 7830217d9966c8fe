"""Declarative suites; installed as ptqbench_suites so that `ptqbench run` finds tiny.toml."""
