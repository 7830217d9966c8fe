"""Leaderboards from records: rows, FP reference, filters, CI marks, all three formats."""
import csv
import io

import pytest
from click.testing import CliRunner

from ptqbench.cli import cli
from ptqbench.report import leaderboard, load_records, records_frame, to_csv, to_markdown
from ptqbench.store import Store


def rec(method, bits, mse, ci, seed=0, status="ok"):
    return {"cell": {"model": "m", "sampler": "s", "bits": bits, "method": method, "seed": seed},
            "status": status, "error": None if status == "ok" else {"message": "boom"},
            "costs": {"total_seconds": 2.0, "seconds": {"reconstruct": 1.5}},
            "num_samples": 64,
            "metrics": {"paired_mse": {"value": mse, "ci": ci, "higher_is_better": False}}}


@pytest.fixture
def results(tmp_path):
    store = Store(tmp_path)
    rows = [rec("fp", "FP", 0.0, [0.0, 0.0]),
            rec("rtn", "W8A8", 0.010, [0.009, 0.011]),
            rec("brecq", "W8A8", 0.0095, [0.0090, 0.0100]),  # overlaps rtn: not significant
            rec("rtn", "W4A8", 0.100, [0.090, 0.110]),
            rec("brecq", "W4A8", 0.050, [0.045, 0.055]),  # clearly better
            rec("gac", "W4A8", None, None, status="failed")]
    for i, r in enumerate(rows):
        store.write_record(f"k{i}", r)
    return tmp_path


def test_leaderboard_rows_and_significance(results):
    df = records_frame(load_records(results))
    board = leaderboard(df)
    keys = list(zip(board["bits"], board["method"]))
    # the FP reference first, then bit-widths from high to low precision, each best to worst;
    # failed cells left out
    assert keys == [("FP", "fp"), ("W8A8", "brecq"), ("W8A8", "rtn"),
                    ("W4A8", "brecq"), ("W4A8", "rtn")]
    assert board["best"].tolist() == [False, True, False, True, False]
    marks = dict(zip(zip(board["bits"], board["method"]), board["same_as_best"]))
    assert bool(marks[("W8A8", "rtn")])
    assert not marks[("W4A8", "rtn")]


def test_filters(results):
    df = records_frame(load_records(results))
    board = leaderboard(df, bits=["W4A8"], methods=["fp", "rtn"])
    assert set(zip(board["bits"], board["method"])) == {("FP", "fp"), ("W4A8", "rtn")}


def test_markdown_and_csv(results):
    board = leaderboard(records_frame(load_records(results)))
    md = to_markdown(board)
    assert md.splitlines()[0].startswith("| model | sampler | bits | method | paired_mse")
    assert "0.05000 ± 0.0050" in md
    rows = list(csv.DictReader(io.StringIO(to_csv(board))))
    w4 = [r for r in rows if r["bits"] == "W4A8" and r["method"] == "brecq"][0]
    assert float(w4["paired_mse"]) == 0.05 and float(w4["paired_mse_ci_low"]) == 0.045


def test_cli_report(results, tmp_path):
    runner = CliRunner()
    out = runner.invoke(cli, ["report", str(results)])
    assert out.exit_code == 0, out.output
    assert "brecq" in out.output and "1 failed cell" in out.output
    target = tmp_path / "board.md"
    out = runner.invoke(cli, ["report", str(results), "--format", "markdown", "-o", str(target)])
    assert out.exit_code == 0 and target.read_text().startswith("| model")
    out = runner.invoke(cli, ["report", str(tmp_path / "nothing-here")])
    assert out.exit_code != 0 and "not found" in out.output


def test_plot(results, tmp_path):
    target = tmp_path / "plot.png"
    out = CliRunner().invoke(cli, ["report", str(results), "--plot", str(target), "--format", "csv"])
    assert out.exit_code == 0, out.output
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_newest_record_of_a_cell_wins(tmp_path):
    store = Store(tmp_path)
    old = rec("rtn", "W4A8", 0.5, [0.4, 0.6])
    old["finished"] = "2026-01-01T00:00:00"
    new = rec("rtn", "W4A8", 0.1, [0.09, 0.11])
    new["finished"] = "2026-02-01T00:00:00"
    store.write_record("old", old)
    store.write_record("new", new)
    board = leaderboard(records_frame(load_records(tmp_path)))
    assert board["paired_mse"].tolist() == [0.1]


def test_paired_metrics_use_a_paired_test(tmp_path):
    """Two methods whose intervals overlap, but one is worse on every sample: the paired test
    (same seeds) tells them apart where the interval rule could not."""
    import numpy as np

    rng = np.random.default_rng(0)
    n = 200
    fp = rng.integers(40, 200, (n, 1, 8, 8), dtype=np.uint8)
    noise = rng.integers(0, 12, (n, 1, 8, 8))
    store = Store(tmp_path)
    store.write_shard("g-fp", 0, fp)
    store.write_shard("g-a", 0, (fp + noise).astype(np.uint8))
    store.write_shard("g-b", 0, (fp + noise + 1).astype(np.uint8))  # one level worse everywhere
    store.write_shard("g-c", 0, (fp + noise[::-1]).astype(np.uint8))  # same errors, shuffled
    for key, method, gen, mse in [("a", "a", "g-a", 0.00070), ("b", "b", "g-b", 0.00075),
                                  ("c", "c", "g-c", 0.00070)]:
        r = rec(method, "W4A8", mse, [mse - 0.0001, mse + 0.0001])
        r.update(gen_key=gen, fp_gen_key="g-fp", num_samples=n)
        store.write_record(key, r)
    board = leaderboard(records_frame(load_records(tmp_path)))
    marks = dict(zip(board["method"], board["same_as_best"]))
    assert set(board["significance"]) == {"paired"}
    assert marks["b"] == False  # noqa: E712  (intervals overlap, the paired test separates)
    assert marks["c"] == True  # noqa: E712  (same error distribution: not significant)


def test_a_resumed_cell_counts_the_calibration_it_reused(tmp_path):
    r = rec("brecq", "W4A8", 0.05, [0.04, 0.06])
    r["costs"] = {"total_seconds": 20.0, "seconds": {"load_quantized": 0.2, "sample": 19.8}}
    r["costs_calibration_reused"] = {"total_seconds": 110.0,
                                     "seconds": {"quantize": 10.0, "reconstruct": 100.0}}
    Store(tmp_path).write_record("k", r)
    row = records_frame(load_records(tmp_path)).iloc[0]
    assert row["seconds"] == 130.0 and row["calibration_seconds"] == 110.0


def test_several_seeds_get_the_interval_across_seeds(tmp_path):
    # Two methods whose per-seed intervals are tight but whose values move with the seed
    # (calibration randomness): the row's interval must cover that spread.
    store = Store(tmp_path)
    rows = [rec("fp", "FP", 0.0, [0.0, 0.0], seed=s) for s in (0, 1, 2)]
    rows += [rec("a", "W4A8", v, [v - 0.001, v + 0.001], seed=s)
             for s, v in enumerate((0.050, 0.060, 0.040))]
    rows += [rec("b", "W4A8", v, [v - 0.001, v + 0.001], seed=s)
             for s, v in enumerate((0.052, 0.052, 0.052))]
    for i, r in enumerate(rows):
        store.write_record(f"k{i}", r)
    board = leaderboard(records_frame(load_records(tmp_path)))
    a = board[board["method"] == "a"].iloc[0]
    b = board[board["method"] == "b"].iloc[0]
    # mean 0.05, sd 0.01, n 3: +- 4.303 * 0.01 / sqrt(3)
    assert a["paired_mse"] == pytest.approx(0.05)
    assert a["paired_mse__hi"] - 0.05 == pytest.approx(4.303 * 0.01 / 3 ** 0.5, rel=1e-3)
    # seeds that agree exactly keep (never go below) the per-seed interval
    assert b["paired_mse__hi"] - b["paired_mse"] == pytest.approx(0.001)
    # with the seed spread counted, a (0.050) and b (0.052) are not told apart
    assert bool(board[board["method"] == "b"]["same_as_best"].iloc[0]) or \
        bool(board[board["method"] == "a"]["same_as_best"].iloc[0])
    assert "across seeds" in to_markdown(board)
