"""Running a family's small suite (see ptqbench.families_testing.family_suite)."""
import json
from pathlib import Path

from click.testing import CliRunner

from ptqbench.cli import cli
from ptqbench.families_testing import family_suite  # noqa: F401  (re-exported for the tests)


def run_suite(suite: Path, out: Path) -> dict:
    result = CliRunner().invoke(cli, ["run", str(suite), "-o", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    recs = [json.loads(p.read_text()) for p in sorted((out / "records").glob("*.json"))]
    return {(r["cell"]["method"], r["cell"]["bits"]): r for r in recs}
