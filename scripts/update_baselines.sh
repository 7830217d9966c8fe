#!/usr/bin/env bash
# Regenerate the committed baselines of the CI regression checks (suites/baselines/*.json), after
# a change that is meant to move the numbers (a new default, a fixed bug, a new method budget).
# One command, a few minutes on a 2-core CPU; then review `git diff suites/baselines` and commit
# with a message that says why the numbers moved. Hand-edited "slack" tables are kept.
#
#   scripts/update_baselines.sh                      # every suite that .ci/run checks
#   scripts/update_baselines.sh suites/tiny.toml     # only these
#
# Baselines are made on the CPU with 2 torch threads (recorded in the file; `ptqbench check`
# uses the same count), from ptqbench's own plugins only, so that CPU reruns of the same code
# reproduce them bit for bit (README: "Regression checks in CI").
set -euo pipefail
cd "$(dirname "$0")/.."
ptqbench=ptqbench
command -v ptqbench >/dev/null 2>&1 || ptqbench=.venv/bin/ptqbench
suites=("$@")
[ ${#suites[@]} -gt 0 ] || suites=(suites/tiny.toml suites/tiny-methods-ci.toml)
export PTQBENCH_LOAD_EXTERNAL_PLUGINS=0
for suite in "${suites[@]}"; do
    "$ptqbench" check "$suite" --update-baseline --device cpu --threads 2 --no-progress
done
git --no-pager diff --stat -- suites/baselines || true
