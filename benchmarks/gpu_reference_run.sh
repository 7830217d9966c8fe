#!/usr/bin/env bash
# The reference run of issues 11/12 on one H200, in device calls of at most 10 minutes each.
# Data travels in three calls (.carry/c1: wheels' partner data + Inception part 1; c2: Inception
# part 2; c3: the model and the CIFAR train images), each of which also runs a stage:
#   bash benchmarks/gpu_reference_run.sh smoke        # GPU unit tests (no data needed)
#   bash benchmarks/gpu_reference_run.sh determinism-tiny   # deterministic records on CUDA, tiny model
#   bash benchmarks/gpu_reference_run.sh evidence SECONDS   # suites/cifar10-s.toml, resumable
#   bash benchmarks/gpu_reference_run.sh determinism SECONDS [--method M ...]  # cells twice + default
#   bash benchmarks/gpu_reference_run.sh trace SECONDS        # GAC's meta pass on conv_in, per step
#   bash benchmarks/gpu_reference_run.sh seed-records DIR     # continue from committed records in DIR
#   bash benchmarks/gpu_reference_run.sh evidence SECONDS [--method M ...]  # only these methods
#   bash benchmarks/gpu_reference_run.sh gac-cost SECONDS     # benchmarks/gac_cost_solo.toml, alone
#   bash benchmarks/gpu_reference_run.sh w8a8 SECONDS         # benchmarks/w8a8_selection.toml
#   bash benchmarks/gpu_reference_run.sh gac-w4a8 SECONDS     # benchmarks/gac_vs_qdiffusion_w4a8.toml
#   bash benchmarks/gpu_reference_run.sh fid-floor DIR        # benchmarks/fid_floor.py on DIR
#   bash benchmarks/gpu_reference_run.sh dit SECONDS          # family smoke, paper dry run, DiT cells
#   bash benchmarks/gpu_reference_run.sh bench-sampling SECONDS  # issue 15: paths, int8, memory
#   bash benchmarks/gpu_reference_run.sh bench-calibration SECONDS  # 20k+5k, resumes across calls
#   bash benchmarks/gpu_reference_run.sh export-samples DIR   # DIR's samples to $OUT, what fits
# Results are copied to $OUT.
# Several stages in one device call: set one deadline for all of them first, so that each stage's
# limit shrinks to what is left and the call is never killed before its output is printed:
#   export DEADLINE=$(( $(date +%s) + 560 )); bash ... gac-cost 330; bash ... w8a8 400
# Output streams as it comes (the device returns its last 12,000 characters), minus blank lines
# and checkpoint-loading bars.
set -u
stage=${1:?stage}
limit=${2:-540}
shift; [ $# -gt 0 ] && shift
if [ -n "${DEADLINE:-}" ] && [[ "$limit" =~ ^[0-9]+$ ]]; then
    left=$(( DEADLINE - $(date +%s) - 20 ))
    [ "$left" -lt "$limit" ] && limit=$left
    [ "$limit" -lt 1 ] && { echo "$stage: no time left before DEADLINE"; exit 124; }
fi
echo "== $stage (limit ${limit}s) $(date +%T)"
source benchmarks/device_env.sh >/dev/null
export PYTHONUNBUFFERED=1
quiet() { grep --line-buffered -v -e '^\s*$' -e 'Loading checkpoint shards' -e 'non-portable'; }
case "$stage" in
smoke)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    timeout "$limit" python3 -m pytest -q -x -p no:cacheprovider tests/test_reconstruction_gpu.py \
        tests/test_reconstruction_dataflow.py 2>&1 | quiet
    ;;
determinism-tiny)
    timeout "$limit" python3 -m pytest -q -x -p no:cacheprovider tests/test_determinism.py 2>&1 | quiet
    ;;
evidence)
    # as in w8a8: cells that finish before the Inception weights are all here fail at their FID
    # metrics at once; the call that brings the last part reruns them, metrics only
    [ -n "${PTQBENCH_INCEPTION_WEIGHTS:-}" ] || export PTQBENCH_INCEPTION_WEIGHTS=/tmp/no-inception-weights-yet
    out=/tmp/ptq-results/cifar10-s
    mkdir -p "$out"
    # several worker processes share the GPU; MPS lets their kernels overlap where it starts
    nvidia-cuda-mps-control -d 2>/dev/null && echo "MPS daemon started" || echo "no MPS"
    timeout "$limit" ptqbench run benchmarks/cifar10-s-one-gpu.toml -o "$out" --no-progress "$@" \
        2>&1 | quiet
    echo "exit: ${PIPESTATUS[0]}"
    ptqbench report "$out" --format markdown -o "$out/leaderboard.md" >/dev/null 2>&1
    ptqbench report "$out" --format csv -o "$out/leaderboard.csv" >/dev/null 2>&1
    cat "$out/leaderboard.md" 2>/dev/null | head -60
    tar czf "$OUT/cifar10-s-records.tgz" -C "$out" records logs leaderboard.md leaderboard.csv 2>/dev/null
    ls -la "$OUT"
    ;;
gac-cost)
    out=/tmp/ptq-results/gac-cost-solo
    timeout "$limit" ptqbench run benchmarks/gac_cost_solo.toml -o "$out" --no-progress 2>&1 \
        | quiet
    echo "exit: ${PIPESTATUS[0]}"
    python3 - "$out" <<'PY'
import json, pathlib, sys
calib = ("trajectories", "select", "quantize", "reconstruct")
for f in sorted(pathlib.Path(sys.argv[1], "records").glob("*.json")):
    r = json.loads(f.read_text()); c = r["cell"]; s = r.get("costs", {}).get("seconds", {})
    blocks = (r.get("weighting_state") or {}).get("blocks") or []
    meta = round(sum(b.get("meta_seconds", 0) for b in (blocks.values() if isinstance(blocks, dict) else blocks)), 1)
    print(f"{c['method']:12s} seed {c['seed']} {r['status']:6s} calibration {sum(s.get(k, 0) for k in calib):7.1f} s "
          f"(trajectories {s.get('trajectories', 0):.1f}, reconstruct {s.get('reconstruct', 0):.1f}) meta {meta}")
PY
    tar czf "$OUT/gac-cost-solo-records.tgz" -C "$out" records logs 2>/dev/null
    ;;
w8a8|gac-w4a8)
    # Inception weights arrive over several calls: until then FID metrics fail at once (not after
    # a download attempt) and a later call, with the weights, reruns the failed cells, which then
    # load their quantized model and samples from the store and compute the metrics only.
    [ -n "${PTQBENCH_INCEPTION_WEIGHTS:-}" ] || export PTQBENCH_INCEPTION_WEIGHTS=/tmp/no-inception-weights-yet
    suite=benchmarks/w8a8_selection.toml; name=w8a8-selection
    [ "$stage" = gac-w4a8 ] && { suite=benchmarks/gac_vs_qdiffusion_w4a8.toml; name=gac-w4a8; }
    out=/tmp/ptq-results/$name
    timeout "$limit" ptqbench run "$suite" -o "$out" --no-progress 2>&1 | quiet
    echo "exit: ${PIPESTATUS[0]}"
    ptqbench report "$out" --format markdown -o "$out/leaderboard.md" >/dev/null 2>&1
    cat "$out/leaderboard.md" 2>/dev/null | head -20
    tar czf "$OUT/$name-records.tgz" -C "$out" records logs leaderboard.md 2>/dev/null
    ;;
dit)
    t0=$(date +%s)
    timeout $(( limit / 4 )) python3 benchmarks/family_smoke.py --device cuda -o /tmp/ptq-results 2>&1 | quiet
    cp /tmp/ptq-results/family_smoke.json "$OUT/" 2>/dev/null
    ptqbench run suites/paper.toml --dry-run 2>&1 | quiet | tail -25
    out=/tmp/ptq-results/cifar10-dit-s-gpu
    timeout $(( limit - ($(date +%s) - t0) )) ptqbench run benchmarks/cifar10-dit-s-gpu.toml -o "$out" \
        --no-progress 2>&1 | quiet
    echo "exit: ${PIPESTATUS[0]}"
    ptqbench report "$out" --format markdown -o "$out/leaderboard.md" >/dev/null 2>&1
    cat "$out/leaderboard.md" 2>/dev/null | head -20
    tar czf "$OUT/cifar10-dit-s-gpu-records.tgz" -C "$out" records logs leaderboard.md 2>/dev/null
    ;;
bench-sampling)
    timeout "$limit" python3 benchmarks/bench_sampling.py --mode quick \
        --out "$OUT/sampling_quick.md" --json "$OUT/sampling_quick.json" 2>&1 | quiet
    ;;
bench-calibration)
    # the whole W4A8 qdiffusion calibration of the 35.7M layout at 20k + 5k iterations: more than
    # one call; each call resumes from /tmp/bench-calib (machine kept warm between calls)
    timeout "$limit" python3 benchmarks/bench_sampling.py --mode full --stages calibration \
        --work /tmp/bench-calib --out "$OUT/calibration_full.md" --json "$OUT/calibration_full.json" \
        2>&1 | quiet
    ls /tmp/bench-calib/reconstruction 2>/dev/null | grep -c unit_ | sed 's/^/units checkpointed: /'
    ;;
export-samples)
    # the finished cells' samples travel back (two cells per .tar.xz, at most 56 MB a call), for
    # Inception metrics on this side when the weights are not on the GPU machine; a later call
    # sends what did not fit (exported groups are listed in DIR/exported.txt)
    python3 - "$limit" "$OUT" <<'PY'
import json, pathlib, subprocess, sys
root, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
done_file = root / "exported.txt"
done = set(done_file.read_text().split()) if done_file.exists() else set()
keys = sorted({json.loads(f.read_text())["gen_key"] for f in (root / "records").glob("*.json")
               if json.loads(f.read_text())["status"] == "ok"} - done)
total = 0
for i in range(0, len(keys), 2):
    group = keys[i:i + 2]
    name = out / f"samples-{root.name}-{group[0][:8]}.tar.xz"
    subprocess.run(["tar", "-I", "xz -T16 -6", "-cf", str(name), "-C", str(root)]
                   + [f"samples/{k}" for k in group], check=True)
    size = name.stat().st_size
    if total + size > 56e6 or len(list(out.iterdir())) > 7:
        name.unlink(); print("left for a later call:", len(keys) - i, "sample sets"); break
    total += size; done.update(group)
    print(f"{name.name}: {size / 1e6:.1f} MB")
done_file.write_text("\n".join(sorted(done)))
PY
    ;;
fid-floor)
    timeout 300 python3 benchmarks/fid_floor.py "$limit" --json "$OUT/fid-floor-$(basename "$limit").json"
    ;;
determinism)
    timeout "$limit" python3 benchmarks/determinism.py benchmarks/determinism.toml "$@" \
        --json "$OUT/determinism.json" 2>&1 | quiet
    ;;
trace)
    for bits in W4A8 W8A8; do
        timeout "$limit" python3 benchmarks/gac_trace.py ../shared/data/models/cifar10-ddpm-s \
            --blocks conv_in --bits "$bits" --cache /tmp/ptq-trace-cache \
            --json "$OUT/gac-trace-$bits.json" 2>&1 | quiet
    done
    ;;
seed-records)
    # a resumed reference run: the committed records of cells that need no rerun are copied in
    # (the runner skips cells whose record is ok); FP cells and the cells named in RERUN (key
    # prefixes) are left out so that they run again
    src=$limit
    out=/tmp/ptq-results/cifar10-s
    mkdir -p "$out/records"
    for f in "$src"/*.json; do
        key=$(basename "$f" .json)
        python3 - "$f" <<'PY' || continue
import json, os, sys
rec = json.load(open(sys.argv[1]))
rerun = [k for k in os.environ.get("RERUN", "").split(",") if k]
keep = rec["status"] == "ok" and rec["cell"]["method"] != "fp" and \
    not any(rec["key"].startswith(k) for k in rerun)
sys.exit(0 if keep else 1)
PY
        cp -n "$f" "$out/records/$key.json" && echo "kept $key"
    done
    ;;
*)
    echo "unknown stage $stage" >&2; exit 2 ;;
esac
