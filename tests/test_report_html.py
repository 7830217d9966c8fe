"""``ptqbench report --format html``: one self-contained page with the leaderboard, coverage and
plots (issue 16, point 3), opened in a real headless Chromium where the system has one."""
import base64
import re
import shutil
import subprocess
import textwrap
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from ptqbench.cli import cli
from ptqbench.suite.loader import default_suite_path

REFERENCE = Path(__file__).resolve().parents[1] / "results" / "reference" / "superseded" / "cifar10-s-h200-v1"
CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """A results folder with the reference CIFAR-10 records (learned GAC weights, no trajectory
    error: recorded before it existed) and a fresh tiny run (trajectory error), and its page."""
    root = tmp_path_factory.mktemp("html")
    (root / "records").mkdir()
    for p in (REFERENCE / "records").glob("*.json"):
        shutil.copy(p, root / "records" / p.name)
    suite = root / "tiny.toml"
    suite.write_text(textwrap.dedent(f"""
        [suite]
        name = "tiny-html"
        include = ["{default_suite_path()}"]
        [samplers.ddim20]
        steps = 5
        [methods.rtn]
        preset = "rtn"
        selector_options = {{ steps = 2, per_step = 4 }}
        recipe = {{ weight_init = "minmax", act_init = "minmax" }}  # a report test: keep it quick
        [evaluation]
        num_samples = 8
        batch_size = 8
    """))
    run = CliRunner().invoke(cli, ["run", str(suite), "-o", str(root), "--no-progress",
                                   "--bits", "W4A8"])
    assert run.exit_code == 0, run.output
    page = root / "report.html"
    out = CliRunner().invoke(cli, ["report", str(root), "--format", "html", "-o", str(page)])
    assert out.exit_code == 0, out.output
    return page


def test_page_is_self_contained_with_table_and_plots(report):
    text = report.read_text()
    # nothing to fetch at view time: every src is an embedded image, links stay in the page
    refs = re.findall(r'(?:src|href)="([^"]*)"', text)
    assert refs and all(r.startswith("data:image/png;base64,") or r.startswith("#") for r in refs)
    assert "<script" not in text and "@import" not in text and "url(" not in text
    images = re.findall(r'<img class="plot" alt="([^"]+)" src="data:image/png;base64,([^"]+)"', text)
    for _, data in images:
        assert base64.b64decode(data)[:8] == b"\x89PNG\r\n\x1a\n"
    alts = [a for a, _ in images]
    # two blocks (cifar10 + tiny): quality vs bits and Pareto in each; learned weights from the
    # GAC records; trajectory error from the tiny run
    assert alts.count("quality vs bit-width") == 2 and alts.count("quality vs calibration cost") == 2
    assert alts.count("learned weights per sampler step") == 1
    assert alts.count("trajectory error per sampler step") == 1
    assert text.count('<table class="board">') == 2 and text.count('<table class="coverage">') == 2
    # values, intervals and marks as the terminal shows them
    assert '38.31 <span class="hw">± 0.49</span>' in text and "×1e-3" in text
    assert text.count('<td class="mark">★</td>') == 2  # cifar10's W8A8 and W4A8 by FID
    assert "W4 ×111, W8 ×2 (" in text  # coverage: first and last layers stay 8-bit at W4A8


def test_html_needs_an_output_file(report):
    out = CliRunner().invoke(cli, ["report", str(report.parent), "--format", "html"])
    assert out.exit_code != 0 and "-o" in out.output and "Traceback" not in out.output


CHECK = """<script>
window.addEventListener('load', () => {
  const imgs = [...document.images];
  document.body.dataset.images = imgs.filter(i => i.complete && i.naturalWidth > 300).length
                                 + '/' + imgs.length;
  document.body.dataset.rows = document.querySelectorAll('table.board tbody tr').length;
});
</script></body>"""


def _chromium(args: list[str], profile: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu",
                           "--disable-background-networking", "--disable-component-update",
                           "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
                           "--hide-scrollbars", *args], capture_output=True, text=True,
                          timeout=120)


@pytest.mark.skipif(not CHROMIUM.exists(), reason="no /usr/bin/chromium (Debian: apt-get install "
                                                  "chromium) to open the page in a real browser")
def test_page_renders_in_headless_chromium(report, tmp_path):
    from PIL import Image

    # the browser decodes every embedded plot and lays out every leaderboard row
    probe = tmp_path / "probe.html"
    probe.write_text(report.read_text().replace("</body>", CHECK))
    dom = _chromium(["--virtual-time-budget=5000", "--dump-dom", probe.as_uri()],
                    tmp_path / "profile-dom")
    n_img = report.read_text().count('<img class="plot"')
    assert f'data-images="{n_img}/{n_img}"' in dom.stdout, dom.stderr[-2000:]
    rows = report.read_text().count("<tr class=")  # leaderboard rows (coverage rows: <tr>)
    assert rows == 11 + 2 and f'data-rows="{rows}"' in dom.stdout
    # a screenshot of the top of the page holds the table and the first plots
    shot = tmp_path / "shot.png"
    _chromium([f"--screenshot={shot}", "--window-size=1280,2000", report.as_uri()],
              tmp_path / "profile-shot")
    img = Image.open(shot).convert("RGB")
    assert img.size == (1280, 2000)
    pixels = np.asarray(img).reshape(-1, 3).astype(int)

    def near(color, tol=30):
        return int((np.abs(pixels - np.array(color)) <= tol).all(axis=1).sum())

    assert near((0xea, 0xf5, 0xea), 3) > 2000  # the best rows' background: the table is there
    assert near((0x1d, 0x1d, 0x1f), 40) > 5000  # text
    assert near((31, 119, 180)) > 300 and near((255, 127, 14)) > 300  # plot lines (tab10)


def test_pareto_front_by_hand():
    from ptqbench.reporting.plots import pareto_front

    # (calibration seconds, FID): W4A8 of the reference run, rounded
    points = [(1.3, 55.1), (70.1, 51.7), (102.1, 48.4), (111.7, 40.9), (213.1, 49.7), (93.0, 52.0)]
    assert pareto_front(points, higher_is_better=False) == [0, 1, 2, 3]
    # PSNR-like (higher is better): the cheapest point is on the front, then each improvement
    assert pareto_front([(1, 20.0), (5, 19.0), (9, 25.0), (3, 22.0)], True) == [0, 3, 2]
