"""Grid expansion: counts, FP once per (model, sampler, seed), stable and distinct keys."""
import textwrap

from ptqbench.suite.expand import expand
from ptqbench.suite.loader import load_suite

SUITE = """
[models.a]
path = "builtin:tiny-mnist"
[models.b]
path = "builtin:tiny-mnist"
[samplers.s1]
steps = 10
[samplers.s2]
steps = 20
spacing = "quad"
[grid]
models = ["a", "b"]
samplers = ["s1", "s2"]
bits = ["W8A8", "W4A8", "W4A32"]
methods = ["fp", "rtn", "tuned"]
seeds = [0, 1]
[methods.tuned]
preset = "rtn"
recipe = { weight_init = "minmax" }
"""


def load(tmp_path, text=SUITE):
    path = tmp_path / "s.toml"
    path.write_text(textwrap.dedent(text))
    return load_suite(path)


def test_counts_and_order(tmp_path):
    cells = expand(load(tmp_path))
    fp = [c for c in cells if c.is_fp]
    quant = [c for c in cells if not c.is_fp]
    assert len(fp) == 2 * 2 * 2  # models x samplers x seeds
    assert len(quant) == 2 * 2 * 2 * 3 * 2  # ... x bits x two quantized methods
    assert cells[:len(fp)] == fp  # FP cells run first: the others are paired with them
    assert len({c.key for c in cells}) == len(cells)


def test_keys_are_stable_and_pair_with_fp(tmp_path):
    a, b = expand(load(tmp_path)), expand(load(tmp_path))
    assert [c.key for c in a] == [c.key for c in b]
    fp_keys = {(c.model, c.sampler, c.seed): c.gen_key for c in a if c.is_fp}
    for c in a:
        assert c.fp_gen_key == fp_keys[(c.model, c.sampler, c.seed)]


def test_override_changes_quant_key_but_not_fp(tmp_path):
    cells = expand(load(tmp_path))
    rtn = {(c.model, c.sampler, c.bits, c.seed): c for c in cells if c.method == "rtn"}
    tuned = {(c.model, c.sampler, c.bits, c.seed): c for c in cells if c.method == "tuned"}
    for k in rtn:
        assert rtn[k].quant_key != tuned[k].quant_key
        assert rtn[k].fp_gen_key == tuned[k].fp_gen_key


def test_metrics_change_record_key_but_not_samples(tmp_path):
    base = {c.title(): c for c in expand(load(tmp_path))}
    more = SUITE + '\n[evaluation]\nmetrics = ["paired", "fid-to-fp"]\n'
    changed = {c.title(): c for c in expand(load(tmp_path, more))}
    for title, c in base.items():
        assert changed[title].key != c.key
        assert changed[title].gen_key == c.gen_key
