#!/usr/bin/env bash
# Runs (or resumes) suites/cifar10-s.toml on the GPU machine and copies the records back.
# Needs, from earlier calls of the same warm machine: the Inception weights assembled by
# device_env.sh under /tmp/ptq-data/inception, and the model + CIFAR arrays (carry .carry/c3).
# Usage (one device call):  bash benchmarks/run_cifar10_suite.sh SECONDS [SUITE [RUN ARGS...]]
#   e.g. bash benchmarks/run_cifar10_suite.sh 540 benchmarks/cifar10_diag.toml --cell 36dc --cell a75d
# The suite is resumable: a call that ends mid-suite loses at most one sampling shard or one
# reconstruction block; call again until it prints that every cell finished.
set -u
limit=${1:-540}
suite=${2:-suites/cifar10-s.toml}
shift 2 2>/dev/null || shift $#
source benchmarks/device_env.sh
out=/tmp/ptq-results/cifar10-s
mkdir -p "$out"
PYTHONUNBUFFERED=1 timeout "$limit" ptqbench run "$suite" -o "$out" --no-progress "$@"
echo "exit: $?"
ptqbench report "$out" --format markdown -o "$out/leaderboard.md" || true
ptqbench report "$out" --format csv -o "$out/leaderboard.csv" || true
ptqbench report "$out" --sort fid_to_fp --format csv --plot "$out/fid_to_fp.png" -o /dev/null || true
python3 benchmarks/compare_methods.py "$out" --a gac --b qdiffusion -o "$out/gac_vs_qdiffusion.json" || true
if [ -n "${OUT:-}" ]; then
    tar czf "$OUT/cifar10-s-records.tgz" -C "$out" records leaderboard.md leaderboard.csv \
        fid_to_fp.png gac_vs_qdiffusion.json 2>/dev/null
fi
