#!/usr/bin/env bash
# Source this on the GPU machine (repo root as cwd). It installs the carried wheels and ptqbench
# into /tmp/site (the image has torch but no diffusers/torch-fidelity), and links the data that
# earlier calls left under /tmp/ptq-data to ../shared/data, where the suites expect it.
set -e
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --upgrade \
    --target /tmp/site . >/dev/null
export PYTHONPATH=/tmp/site
export PATH=/tmp/site/bin:$PATH
mkdir -p /tmp/ptq-data ../shared
[ -e ../shared/data ] || ln -s /tmp/ptq-data ../shared/data
# data carried in this call (.carry/data/...) joins what earlier calls left in /tmp/ptq-data
if [ -d .carry/data ]; then cp -rn .carry/data/. /tmp/ptq-data/; fi
python3 -c 'import torch, diffusers, torch_fidelity, ptqbench; print("torch", torch.__version__, "cuda", torch.cuda.device_count(), "diffusers", diffusers.__version__)'
set +e
