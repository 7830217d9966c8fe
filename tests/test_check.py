"""``ptqbench check``: tolerance rules on hand-made cells, the baseline file, the record fields
that must reproduce bit for bit."""
import json
import math

import numpy as np
import pytest

from ptqbench.baseline import CellResult, Snapshot, read_baseline, write_baseline
from ptqbench.check import Slack, compare, compare_metric, parse_slack, slack_from_baseline
from ptqbench.check_report import to_markdown
from ptqbench.errors import PtqbenchError
from ptqbench.reproducible import comparable, differences, fingerprint

IDENT = ("m", "s", "W4A8", "rtn", 0)


def cell(metrics, ident=IDENT, key="k1", status="ok", fp="f", per_sample=None, values=None):
    return CellResult(ident=ident, key=key, status=status, error=None if status == "ok" else
                      "RuntimeError: boom", metrics=metrics, fingerprint=fp,
                      per_sample_mse=None if per_sample is None else np.asarray(per_sample, float),
                      values_per_sample=values)


def fid(value, lo=None, hi=None):
    out = {"value": value, "higher_is_better": False}
    if lo is not None:
        out["ci"] = [lo, hi]
    return out


def test_parse_slack():
    s = parse_slack(["paired_mse=0.001", "paired_mse=5%", "*=2%"])
    assert s["paired_mse"] == Slack(abs=0.001, rel=0.05) and s["*"] == Slack(rel=0.02)
    assert s["paired_mse"].amount(2.0) == pytest.approx(0.001 + 0.1)
    for bad in ("paired_mse", "=1", "fid=x", "fid=-1", "fid=inf%"):
        with pytest.raises(PtqbenchError, match="--slack"):
            parse_slack([bad])
    assert slack_from_baseline({"fid": {"abs": 0.5}}, "b.json") == {"fid": Slack(abs=0.5)}
    with pytest.raises(PtqbenchError, match=r"b.json: slack.fid"):
        slack_from_baseline({"fid": {"absolute": 0.5}}, "b.json")


def test_interval_rule():
    base = cell({"fid": fid(10.0, 9.0, 11.0)})
    # worse by 2 > sqrt(1^2 + 1^2): regressed; tolerance is 1.414...
    m = compare_metric(IDENT, "fid", base, cell({"fid": fid(12.0, 11.0, 13.0)}), Slack())
    assert m.verdict == "regressed" and m.worse == 2.0 and m.tolerance == pytest.approx(math.sqrt(2))
    assert m.test == "95% CI"
    # the same worsening within an absolute slack of 1 (tolerance 2.414) or a relative 10%
    assert compare_metric(IDENT, "fid", base, cell({"fid": fid(12.0, 11.0, 13.0)}),
                          Slack(abs=1.0)).verdict == "ok"
    assert compare_metric(IDENT, "fid", base, cell({"fid": fid(12.0, 11.0, 13.0)}),
                          Slack(rel=0.1)).tolerance == pytest.approx(math.sqrt(2) + 1.0)
    # worse by 1 <= 1.414: not significant
    assert compare_metric(IDENT, "fid", base, cell({"fid": fid(11.0, 10.0, 12.0)}),
                          Slack()).verdict == "ok"
    # better by 3 > 1.414: improved (never a failure)
    assert compare_metric(IDENT, "fid", base, cell({"fid": fid(7.0, 6.0, 8.0)}),
                          Slack()).verdict == "improved"
    # higher is better: a drop is the worsening; asymmetric intervals use the facing sides
    psnr = lambda v, lo, hi: {"value": v, "ci": [lo, hi], "higher_is_better": True}  # noqa: E731
    m = compare_metric(IDENT, "psnr", cell({"psnr": psnr(20.0, 19.0, 20.5)}),
                       cell({"psnr": psnr(18.0, 17.0, 21.0)}), Slack())
    assert m.worse == 2.0 and m.tolerance == pytest.approx(math.hypot(1.0, 3.0))
    assert m.verdict == "ok"
    # no intervals: exact values, any worsening beyond the slack fails
    assert compare_metric(IDENT, "fid", cell({"fid": fid(10.0)}), cell({"fid": fid(10.001)}),
                          Slack()).verdict == "regressed"
    # a value that is gone is a regression
    gone = compare_metric(IDENT, "fid", base, cell({"fid": {"value": None,
                                                            "unavailable": "no weights"}}), Slack())
    assert gone.verdict == "missing" and gone.note == "no weights"


def test_paired_rule_uses_the_per_sample_difference():
    rng = np.random.default_rng(0)
    base_mse = rng.uniform(0.01, 0.05, 64)
    metrics = {"paired_mse": {"value": float(base_mse.mean()), "ci": [0.0, 1.0],
                              "higher_is_better": False},
               "paired_psnr": {"value": 15.0, "ci": [0.0, 100.0], "higher_is_better": True}}
    base = cell(metrics, per_sample=base_mse, values=784)
    # every sample 0.001 worse: the intervals (here absurdly wide) would never see it; the
    # paired difference is exactly 0.001 with a zero-width interval
    worse = cell(metrics, per_sample=base_mse + 0.001, values=784)
    m = compare_metric(IDENT, "paired_mse", base, worse, Slack())
    assert m.test == "paired" and m.verdict == "regressed"
    assert m.worse == pytest.approx(0.001) and m.tolerance == pytest.approx(0.0, abs=1e-12)
    p = compare_metric(IDENT, "paired_psnr", base, worse, Slack())
    assert p.test == "paired" and p.verdict == "regressed" and p.worse > 0
    # within a slack of 0.002 it passes; the same samples pass with worse = 0
    assert compare_metric(IDENT, "paired_mse", base, worse, Slack(abs=0.002)).verdict == "ok"
    same = compare_metric(IDENT, "paired_mse", base, cell(metrics, per_sample=base_mse,
                                                          values=784), Slack())
    assert same.verdict == "ok" and same.worse == 0.0
    # noise around zero: not significant
    noisy = cell(metrics, per_sample=base_mse + rng.normal(0, 0.002, 64), values=784)
    assert compare_metric(IDENT, "paired_mse", base, noisy, Slack()).verdict != "regressed"
    # without per-sample values on one side the intervals decide
    assert compare_metric(IDENT, "paired_mse", base, cell(metrics), Slack()).test == "95% CI"


def test_cells_missing_new_failed_and_changed():
    other = ("m", "s", "W8A8", "rtn", 0)
    fp = ("m", "s", "FP", "fp", 0)
    base = Snapshot(cells={IDENT: cell({"fid": fid(10.0)}),
                           other: cell({"fid": fid(5.0)}, ident=other),
                           fp: cell({"fid": fid(1.0)}, ident=fp)})
    new = ("m", "s", "W4A8", "gac", 0)
    cur = Snapshot(cells={IDENT: cell({"fid": fid(10.0)}, key="k2", fp="g"),
                          fp: cell({"fid": fid(1.0)}, ident=fp, status="failed"),
                          new: cell({"fid": fid(3.0)}, ident=new)})
    res = compare(base, cur)
    what = {(n.what, n.ident): n.failure for n in res.notes}
    assert what == {("missing", other): True, ("new", new): False, ("failed", fp): True,
                    ("config changed", IDENT): False}
    assert not res.passed and res.regressions == [] and res.identical == []
    assert compare(base, cur, allow_missing=True).failures[0].what == "failed"
    # exact: the same values from different record fields (fingerprints) fail
    one = Snapshot(cells={IDENT: cell({"fid": fid(10.0)})})
    assert compare(one, Snapshot(cells={IDENT: cell({"fid": fid(10.0)})}), exact=True).passed
    # same key, code and numerics (none recorded here), other bits: said; failed with --exact
    res = compare(one, Snapshot(cells={IDENT: cell({"fid": fid(10.0)}, fp="g")}))
    assert res.passed and [(n.what, n.failure) for n in res.notes] == [("not reproduced", False)]
    res = compare(one, Snapshot(cells={IDENT: cell({"fid": fid(10.0)}, fp="g")}), exact=True)
    assert not res.passed and res.failures[0].what == "not reproduced"
    text = to_markdown(res, baseline="b.json")
    assert "**FAILED**" in text and "not reproduced" in text and "b.json" in text
    # other numerics or other code: differing bits are expected and not mentioned
    moved = Snapshot(cells={IDENT: cell({"fid": fid(10.0)}, fp="g")}, numerics={"device": "cuda"},
                     versions={"torch": "2.15"})
    res = compare(Snapshot(cells=one.cells, numerics={"device": "cpu"},
                           versions={"torch": "2.14"}), moved)
    assert res.passed and res.notes == []
    assert res.numerics_changed == ["device cpu -> cuda", "torch 2.14 -> 2.15"]
    assert "bit-identical results are not expected" in to_markdown(res)


def test_baseline_round_trip_keeps_per_sample_values_and_slack(tmp_path):
    per = np.random.default_rng(1).uniform(0, 1, 37)
    c = cell({"paired_mse": {"value": float(per.mean()), "ci": [0.1, 0.9],
                             "higher_is_better": False, "n": 37}}, per_sample=per, values=784)
    c.samples_sha256 = "ab" * 32
    path = tmp_path / "baselines" / "x.json"
    write_baseline(Snapshot(cells={IDENT: c}, suite="x", numerics={"torch_threads": 2}), path)
    back = read_baseline(path)
    got = back.cells[IDENT]
    assert np.array_equal(got.per_sample_mse, per) and got.values_per_sample == 784
    assert got.metrics == c.metrics and got.fingerprint == c.fingerprint
    assert back.suite == "x" and back.numerics == {"torch_threads": 2}
    # slack is edited by hand and survives an update
    obj = json.loads(path.read_text())
    obj["slack"] = {"paired_mse": {"rel": 0.1}}
    path.write_text(json.dumps(obj))
    write_baseline(Snapshot(cells={IDENT: c}, suite="x"), path)
    assert read_baseline(path).slack == {"paired_mse": {"rel": 0.1}}
    path.write_text('{"format": "something-else"}')
    with pytest.raises(PtqbenchError, match="x.json: format"):
        read_baseline(path)
    with pytest.raises(PtqbenchError, match="baseline not found"):
        read_baseline(tmp_path / "none.json")


def test_compared_record_fields():
    record = {
        "key": "k", "cell": {"method": "gac"}, "status": "ok", "error": None,
        "metrics": {"paired_mse": {"value": 0.01, "ci": [0.009, 0.011]}},
        "model_identity": {"path": "/home/a/model", "weights_sha256": "w"},
        "reconstruction": {"seconds": 3.0, "blocks": [
            {"name": "b0", "loss": [[0, 1.5]], "seconds": 1.0, "iters_per_s": 9.0,
             "steady_iters_per_s": 10.0, "peak_gpu_mb": 5.0, "cache_bytes_host": 7,
             "resumed": True, "meta_seconds": 0.4}]},
        "costs": {"total_seconds": 9.0}, "started": "t0", "finished": "t1",
        "host": {"host": "a"}, "git": {"commit": "c1"}, "code": {"ptqbench": {"sha256": "x"}},
    }
    view = comparable(record)
    assert view["model_identity"] == {"weights_sha256": "w"}
    assert view["reconstruction"] == {"blocks": [{"name": "b0", "loss": [[0, 1.5]]}]}
    assert "costs" not in view and "host" not in view and "code" not in view
    other_run = json.loads(json.dumps(record))
    other_run.update(costs={"total_seconds": 1.0}, started="t5", host={"host": "b"},
                     git={"commit": "c2"}, code={"ptqbench": {"sha256": "y"}})
    other_run["model_identity"]["path"] = "/elsewhere"
    other_run["reconstruction"]["blocks"][0].update(seconds=2.0, resumed=False, iters_per_s=1.0)
    assert fingerprint(other_run) == fingerprint(record)
    other_run["reconstruction"]["blocks"][0]["loss"][0][1] = 1.5000000001
    assert fingerprint(other_run) != fingerprint(record)
    assert differences(record, other_run) == ["reconstruction.blocks[0].loss[0][1]"]


def write_results(root, mse_w4=0.02, finished="2026-01-01T00:00:00"):
    """A results folder of three cells with CI'd paired MSE and no samples (intervals decide)."""
    from ptqbench.store import Store

    store = Store(root)
    for bits, method, value in (("FP", "fp", 0.0), ("W8A8", "rtn", 0.001),
                                ("W4A8", "rtn", mse_w4)):
        rec = {"key": f"{bits}-{method}", "status": "ok", "finished": finished,
               "cell": {"model": "m", "sampler": "s", "bits": bits, "method": method, "seed": 0},
               "metrics": {"paired_mse": {"value": value, "ci": [0.9 * value, 1.1 * value],
                                          "higher_is_better": False, "n": 64}},
               "host": {"device": "cpu"}, "versions": {"torch": "2.14.1"}}
        store.write_record(rec["key"], rec)
    return root


def test_check_command_on_a_results_folder(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from ptqbench.cli import cli

    def check(*args, env=None):
        return CliRunner().invoke(cli, ["check", *map(str, args)], env=env)

    res = write_results(tmp_path / "res")
    baseline = tmp_path / "b.json"
    assert "needs --baseline FILE" in check(res).output
    assert "neither a suite file nor a results folder" in check(tmp_path / "nope").output
    assert "--slack 'fid'" in check(res, "--baseline", baseline, "--slack", "fid").output
    assert "baseline not found" in check(res, "--baseline", baseline).output
    assert check(res, "--baseline", baseline, "--update-baseline").exit_code == 0
    summary = tmp_path / "step_summary.md"
    ok = check(res, "--baseline", baseline, env={"GITHUB_STEP_SUMMARY": str(summary)})
    assert ok.exit_code == 0, ok.output
    assert "PASSED: 3 cells compared, 3 identical" in ok.output
    # W4A8 worse by 25%: 0.005 > hypot(0.002, 0.0025) = 0.0032
    write_results(tmp_path / "res", mse_w4=0.025, finished="2026-01-02T00:00:00")
    bad = check(res, "--baseline", baseline, env={"GITHUB_STEP_SUMMARY": str(summary)})
    assert bad.exit_code == 1 and "regressed" in bad.output and "FAILED" in bad.output
    text = summary.read_text()  # appended, as GitHub expects of every step
    assert text.count("## ptqbench check") == 2 and "**FAILED**" in text
    assert "W4A8 rtn seed 0 | paired_mse | 0.02 | 0.025 | +0.005 (+25%) | 0.0032" in text
    # a slack of 30% (here on every metric) lets it pass
    assert check(res, "--baseline", baseline, "--slack", "*=30%").exit_code == 0
