"""The terminal leaderboard fits 80 and 120 columns without cutting a value (issue 19): numbers
to 3-4 significant digits, constant columns in the title, stacked or split tables when the
metrics do not fit, --metrics, marks that survive output without colour, bit-width order."""
import io
import re
from pathlib import Path

import pytest
from click.testing import CliRunner
from rich.console import Console

from ptqbench.cli import cli
from ptqbench.report import bits_order, leaderboard, load_records, print_rich, records_frame
from ptqbench.reporting.numbers import (column_exponent, format_cell, format_half_width,
                                        format_value)
from ptqbench.reporting.terminal import blocks
from ptqbench.store import Store

REFERENCE = Path(__file__).resolve().parents[1] / "results" / "reference" / "superseded" / "cifar10-s-h200-v1"
REFERENCES = [REFERENCE, REFERENCE / "gac-cost"]


def render(board, width: int, **kw) -> str:
    out = io.StringIO()
    console = Console(width=width, file=out, color_system=None, legacy_windows=False)
    print_rich(board, console, **kw)
    return out.getvalue()


def test_numbers_by_hand():
    assert format_cell(38.3127, 37.8227, 38.8027).inline() == "38.31 ± 0.49"
    assert format_cell(8.3601, 8.1601, 8.5601).inline() == "8.36 ± 0.20"  # not 8.360
    assert format_cell(0.002708, 0.002708 - 1.908e-05, 0.002708 + 1.908e-05,
                       exponent=-3).inline() == "2.708 ± 0.019"
    assert format_cell(0.0, 0.0, 0.0).inline() == "0"
    assert format_cell(None).inline() == "n/a"
    assert format_cell(12.3456).inline() == "12.35"  # no interval: 4 significant digits
    assert format_value(1.0, 1.3) == "1.00"  # never fewer than 3 significant digits
    assert format_half_width(123.4) == "120" and format_half_width(0.004555) == "0.0046"
    assert column_exponent([0.0027, 0.00025, None]) == -3
    assert column_exponent([38.3, 0.0]) == 0 and column_exponent([52000.0]) == 3


def test_bit_widths_from_high_to_low_precision():
    labels = ["W4A32", "W4A8", "FP", "W8A8", "W4A4", "W8A16"]
    assert sorted(labels, key=bits_order) == ["FP", "W8A8", "W8A16", "W4A8", "W4A4", "W4A32"]


def _row_lines(lines: list[str], bits: str, method: str) -> list[int]:
    pat = re.compile(rf"^{re.escape(bits)}\s+{re.escape(method)}\s")
    return [i for i, line in enumerate(lines) if pat.match(line)]


@pytest.mark.parametrize("folder", REFERENCES, ids=["cifar10-s-h200", "gac-cost"])
@pytest.mark.parametrize("width", [80, 120])
def test_reference_leaderboard_fits(folder, width):
    board = leaderboard(records_frame(load_records(folder)))
    text = render(board, width)
    lines = text.splitlines()
    assert "…" not in text and "..." not in text
    assert max(len(line.rstrip()) for line in lines) <= width
    # every value of the records, rounded, on its row (inline, or stacked over its interval)
    checked = 0
    for block in blocks(board):
        for _, row in block.rows.iterrows():
            at = _row_lines(lines, str(row["bits"]), str(row["method"]))
            assert at, f"no line for {row['bits']} {row['method']}"
            for m in block.metrics:
                cell = format_cell(row[m], row[f"{m}__lo"], row[f"{m}__hi"], block.exponents[m])
                inline = any(cell.inline() in lines[i] for i in at)
                stacked = cell.half_width and any(
                    cell.value in lines[i] and f"±{cell.half_width}" in lines[i + 1] for i in at)
                assert inline or stacked, (m, row["method"], cell)
                checked += 1
    assert checked >= 4 * 5
    # what is the same on every row is said once, in the title
    assert "cifar10-ddpm-s, ddim100-quad, 10000 samples" in text.replace("\n", " ")
    assert not any(_row_lines(lines, "W4A8", "cifar10-ddpm-s"))


def test_narrow_terminal_splits_and_120_keeps_one_table():
    board = leaderboard(records_frame(load_records(REFERENCE)))
    assert "(1/2)" in render(board, 80)  # five metrics with intervals: two tables at 80
    wide = render(board, 120)
    assert "(1/" not in wide and "38.31 ± 0.49" in wide
    # fid_to_fp for W4A8 eda-dm, and the paired MSE column in units of 1e-3
    assert "8.36 ± 0.20" in wide and "×1e-3" in wide and "2.708 ± 0.019" in wide


def test_bit_width_groups_marks_and_order_without_colour():
    board = leaderboard(records_frame(load_records(REFERENCE)))
    lines = render(board, 120).splitlines()
    first = {b: min(_row_lines(lines, b, m)[0] for m in ("fp", "rtn", "eda-dm")
                    if _row_lines(lines, b, m)) for b in ("FP", "W8A8", "W4A8")}
    assert first["FP"] < first["W8A8"] < first["W4A8"]  # high to low precision
    # a rule between groups
    assert set(lines[first["W4A8"] - 1].strip()) == {"─"}
    # the best row of each bit-width by FID carries ★ (W8A8 rtn 38.35, W4A8 eda-dm 40.86)
    assert "★" in lines[_row_lines(lines, "W8A8", "rtn")[0]]
    assert "★" in lines[_row_lines(lines, "W4A8", "eda-dm")[0]]
    assert "★" not in lines[_row_lines(lines, "W4A8", "rtn")[0]]


def rec(method, bits, mse, half):
    return {"cell": {"model": "m", "sampler": "s", "bits": bits, "method": method, "seed": 0},
            "status": "ok", "costs": {"total_seconds": 2.0}, "num_samples": 64,
            "metrics": {"paired_mse": {"value": mse, "ci": [mse - half, mse + half],
                                       "higher_is_better": False},
                        "fid": {"value": 100 * mse, "ci": [100 * mse - 1, 100 * mse + 1],
                                "higher_is_better": False}}}


def test_same_as_best_mark(tmp_path):
    store = Store(tmp_path)
    for i, r in enumerate([rec("fp", "FP", 0.0, 0.0), rec("a", "W4A8", 0.050, 0.001),
                           rec("b", "W4A8", 0.0505, 0.001), rec("c", "W4A8", 0.09, 0.001)]):
        store.write_record(f"k{i}", r)
    board = leaderboard(records_frame(load_records(tmp_path)), sort="paired_mse")
    lines = render(board, 80).splitlines()
    assert "★" in lines[_row_lines(lines, "W4A8", "a")[0]]
    assert "≈" in lines[_row_lines(lines, "W4A8", "b")[0]]
    assert not {"★", "≈"} & set(lines[_row_lines(lines, "W4A8", "c")[0]])


def test_metrics_option_chooses_and_orders_columns():
    runner = CliRunner()
    out = runner.invoke(cli, ["report", str(REFERENCE), "--metrics", "fid_to_fp,fid"],
                        env={"COLUMNS": "80"})
    assert out.exit_code == 0, out.output
    header = next(line for line in out.output.splitlines() if line.startswith("bits"))
    assert header.index("fid_to_fp") < header.index(" fid ") and "sfid" not in out.output
    assert "by fid_to_fp" in out.output.replace("\n", " ")  # ranked by the first one chosen
    out = runner.invoke(cli, ["report", str(REFERENCE), "--metrics", "fid,nope"])
    assert out.exit_code != 0 and "'nope'" in out.output and "Traceback" not in out.output
    md = runner.invoke(cli, ["report", str(REFERENCE), "--metrics", "sfid", "--format", "markdown"])
    assert md.output.splitlines()[0].startswith("| model | sampler | bits | method | sfid | seeds")
