"""[evaluation] execution: validation, and which settings change the samples' keys."""
import textwrap

import pytest

from ptqbench.errors import SuiteError
from ptqbench.suite.expand import expand
from ptqbench.suite.loader import load_suite

SUITE = """
[models.m]
path = "builtin:tiny-mnist"
[samplers.s]
steps = 5
[grid]
models = ["m"]
samplers = ["s"]
bits = ["W8A8"]
methods = ["fp", "rtn"]
[evaluation]
num_samples = 8
"""


def cells(tmp_path, extra=""):
    path = tmp_path / "s.toml"
    path.write_text(textwrap.dedent(SUITE + extra))
    return {c.method: c for c in expand(load_suite(path))}


def test_exact_fast_paths_keep_the_reference_keys(tmp_path):
    base = cells(tmp_path)
    for extra in ('execution = "reference"\n', 'execution = "fast"\n',
                  'execution_options = { compile = false, cuda_graphs = false }\n'):
        other = cells(tmp_path, extra)
        assert {m: c.gen_key for m, c in other.items()} == {m: c.gen_key for m, c in base.items()}


def test_numerics_that_change_samples_change_their_keys(tmp_path):
    base = cells(tmp_path)
    bf16 = cells(tmp_path, 'execution_options = { dtype = "bf16" }\n')
    assert bf16["fp"].gen_key != base["fp"].gen_key and bf16["rtn"].gen_key != base["rtn"].gen_key
    assert bf16["rtn"].fp_gen_key == bf16["fp"].gen_key  # still paired with its own FP cell
    assert bf16["rtn"].quant_key == base["rtn"].quant_key  # the calibration is reused
    int8 = cells(tmp_path, 'execution = "int8"\n')
    assert int8["fp"].gen_key == base["fp"].gen_key  # nothing of the FP model runs in int8
    assert int8["rtn"].gen_key != base["rtn"].gen_key


@pytest.mark.parametrize("extra,reason", [
    ('execution = "turbo"\n', "execution must be one of"),
    ('execution_options = { dtype = "fp16" }\n', "dtype"),
    ('execution_options = { graphs = true }\n', "unknown execution option"),
])
def test_bad_execution_settings_name_the_key(tmp_path, extra, reason):
    with pytest.raises(SuiteError, match=reason) as err:
        cells(tmp_path, extra)
    assert "evaluation.execution" in str(err.value)
