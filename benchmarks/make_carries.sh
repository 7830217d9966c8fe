#!/usr/bin/env bash
# Build the data that device calls carry (the GPU machine sees the working tree, not ../shared):
# folders under .carry/ (ignored by git: add "/.carry/" and "/.whl/" to .git/info/exclude), each
# small enough to travel beside the ~18 MB repository in one call (64 MiB in all):
#   .whl       diffusers + torch-fidelity wheels for the GPU image (Python 3.12)      ~6.5 MB
#   .carry/g1  the CIFAR-10 stand-in DDPM + Inception weights (xz) part 1 of 3      ~41 MB
#   .carry/g2  the CIFAR-10 train images (xz) + Inception part 2                     ~49 MB
#   .carry/g3  Inception part 3                                                      ~37 MB
#   .carry/dit the DiT stand-in                                                      ~43 MB
# benchmarks/device_env.sh unpacks *.xz and joins the Inception parts once all three are there.
# Usage: bash benchmarks/make_carries.sh [SHARED_DATA_DIR]   (default ../shared/data)
set -euo pipefail
cd "$(dirname "$0")/.."
data=${1:-../shared/data}
inc="$data/inception/weights-inception-2015-12-05-features-only.pth"
rm -rf .carry/g1 .carry/g2 .carry/g3 .carry/dit
mkdir -p .carry/g1/data/models .carry/g1/data/inception .carry/g2/data/inception \
    .carry/g2/data/cifar10-partial .carry/g3/data/inception .carry/dit/data/models
for m in cifar10-ddpm-s:g1 cifar10-dit-s:dit; do
    name=${m%%:*}; dest=.carry/${m##*:}/data/models/$name
    mkdir -p "$dest" && (cd "$data/models/$name" && find . -type f ! -name '*.png' -print0 \
        | xargs -0 -I{} cp --parents {} "$OLDPWD/$dest/")
done
xz -T0 -6 -c "$data/cifar10-partial/train_x.npy" > .carry/g2/data/cifar10-partial/train_x.npy.xz
tmp=$(mktemp); xz -T0 -6 -c "$inc" > "$tmp"
# 5 MB, 37 MB, the rest (blocks of 0.5 MB): each call's whole tree (the ~18 MB repository, the
# 6.5 MB wheels with g1) must stay under 64 MiB = 67.1 MB
dd if="$tmp" of=.carry/g1/data/inception/weights.xz.1of3 bs=500000 count=10 status=none
dd if="$tmp" of=.carry/g2/data/inception/weights.xz.2of3 bs=500000 skip=10 count=74 status=none
dd if="$tmp" of=.carry/g3/data/inception/weights.xz.3of3 bs=500000 skip=84 status=none
rm -f "$tmp"
if [ ! -d .whl ]; then
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
        -d .whl diffusers==0.42.1 torch-fidelity==0.4.0 importlib_metadata
fi
repo=$(git ls-files -z | du -cb --files0-from=- | tail -1 | cut -f1)
for c in ".whl .carry/g1" .carry/g2 .carry/g3 .carry/dit; do
    total=$(( repo + $(du -scb $c | tail -1 | cut -f1) ))
    awk -v c="$c" -v t="$total" 'BEGIN { printf "%-16s %5.1f MB with the repository%s\n", c,
        t / 1e6, (t > 67108864 ? "  OVER 64 MiB" : "") }'
done
