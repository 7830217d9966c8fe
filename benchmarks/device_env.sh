#!/usr/bin/env bash
# Source this on the GPU machine (repo root as cwd). It installs the carried wheels and ptqbench
# into /tmp/site (the image has torch but no diffusers/torch-fidelity), and links the data that
# earlier calls left under /tmp/ptq-data to ../shared/data, where the suites expect it.
# The .git that travels with the working tree can be stale (seen: the session's first commit), so
# records would name a wrong commit: start the device command with
#   export PTQBENCH_SOURCE_COMMIT=<git rev-parse HEAD, taken here>;
set -e
if [ -d .whl ] && [ ! -d /tmp/site/diffusers ]; then  # once per machine
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --upgrade \
    --target /tmp/site . >/dev/null
export PYTHONPATH=/tmp/site
export PATH=/tmp/site/bin:$PATH
mkdir -p /tmp/ptq-data ../shared
[ -e ../shared/data ] || ln -s /tmp/ptq-data ../shared/data
# data carried in this call (.carry/<name>/data/...) joins what earlier calls left in /tmp/ptq-data
for d in .carry/*/data; do [ -d "$d" ] && cp -rn "$d"/. /tmp/ptq-data/ 2>/dev/null; done
# arrays that travel xz-compressed to fit a call (the CIFAR images: 15.6 -> 11.8 MB)
find /tmp/ptq-data -name '*.xz' | while read -r f; do
    [ -f "${f%.xz}" ] || python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' "$f" "${f%.xz}"
done
# the Inception weights travel in parts (91 MiB > one call's 64 MiB): either raw halves part-aa
# and part-ab, or their xz stream cut into weights.xz.KofN (80 MB, split to fill up other calls)
W=/tmp/ptq-data/inception/weights-inception-2015-12-05-features-only.pth
parts=$(ls /tmp/ptq-data/inception/weights.xz.*of* 2>/dev/null | sort -V)
if [ ! -f "$W" ] && [ -n "$parts" ]; then
    n=$(echo "$parts" | head -1 | sed 's/.*of//')
    if [ "$(echo "$parts" | wc -l)" -eq "$n" ]; then
        cat $parts | python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.stdin.buffer), open(sys.argv[1], "wb"))' "$W.tmp" \
            && mv "$W.tmp" "$W"
        echo "inception weights: $(sha256sum "$W" | cut -c1-16)"
    else
        echo "inception weights: $(echo "$parts" | wc -l) of $n parts here"
    fi
fi
if [ ! -f "$W" ] && [ -f /tmp/ptq-data/inception/part-aa ] && [ -f /tmp/ptq-data/inception/part-ab ]; then
    cat /tmp/ptq-data/inception/part-aa /tmp/ptq-data/inception/part-ab > "$W.tmp" && mv "$W.tmp" "$W"
    echo "inception weights: $(sha256sum "$W" | cut -c1-16)"
fi
[ -f "$W" ] && export PTQBENCH_INCEPTION_WEIGHTS="$W"
python3 -c 'import torch, diffusers, torch_fidelity, ptqbench; print("torch", torch.__version__, "cuda", torch.cuda.device_count(), "diffusers", diffusers.__version__)'
set +e
