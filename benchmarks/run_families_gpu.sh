#!/usr/bin/env bash
# Issue 14's GPU evidence in one device call (resumable: call again until every cell finished):
#   1. every model family's tiny random instance end to end on the GPU (benchmarks/family_smoke.py),
#   2. suites/paper.toml --dry-run (offline validation; what is local, what must be downloaded),
#   3. the class-conditional DiT stand-in (suites/cifar10-dit-s.toml): fp, rtn, qdiffusion, gac at
#      W8A8 and W4A8, leaderboard printed and written.
# Needs (see device_env.sh): the wheels in .whl, the DiT stand-in and the CIFAR train array carried
# as .carry/<name>/data/models/cifar10-dit-s and .carry/<name>/data/cifar10-partial/train_x.npy,
# and the Inception weights from earlier calls (for fid; without them fid reports the error).
# Usage: bash benchmarks/run_families_gpu.sh [SECONDS]
set -u
limit=${1:-560}
start=$(date +%s)
source benchmarks/device_env.sh
out=/tmp/ptq-results/cifar10-dit-s
mkdir -p "$out"
if [ ! -f /tmp/ptq-results/family_smoke.done ]; then
    PYTHONUNBUFFERED=1 python3 benchmarks/family_smoke.py --device cuda -o /tmp/ptq-results \
        && touch /tmp/ptq-results/family_smoke.done
else
    cat /tmp/ptq-results/family_smoke.json | python3 -c 'import json,sys; [print(r) for r in json.load(sys.stdin)["rows"]]'
fi
suite=suites/cifar10-dit-s.toml
if [ -z "${PTQBENCH_INCEPTION_WEIGHTS:-}" ]; then
    # no Inception weights on this machine: paired error only (cells with other keys)
    echo "WARNING: no Inception weights (see device_env.sh): the DiT run scores paired error only"
    suite=suites/.cifar10-dit-s-paired.toml  # beside the original: its relative paths hold
    sed -e 's/^metrics = .*/metrics = ["paired"]/' -e '/^\[evaluation.metric_options.fid\]/,+1d' \
        suites/cifar10-dit-s.toml > "$suite"
fi
left=$(( limit - ($(date +%s) - start) ))
PYTHONUNBUFFERED=1 timeout "$left" ptqbench run "$suite" -o "$out" --no-progress
echo "exit: $?"
ptqbench report "$out" --format markdown -o "$out/leaderboard.md" || true
ptqbench report "$out" --format csv -o "$out/leaderboard.csv" || true
cat "$out/leaderboard.md" 2>/dev/null
if [ -n "${OUT:-}" ]; then
    cp /tmp/ptq-results/family_smoke.json "$OUT/" 2>/dev/null
    tar czf "$OUT/cifar10-dit-s-records.tgz" -C "$out" records leaderboard.md leaderboard.csv 2>/dev/null
fi
