#!/usr/bin/env bash
# The checks that need an NVIDIA GPU, in one run: the CUDA tests (tests marked `cuda`), then
# benchmarks/random_llama.py at the 7B shape against transformers + bitsandbytes.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]
#
# On a machine with PyTorch (CUDA), transformers, accelerate, pytest and setuptools but no
# network, put the wheels of codelm's other dependencies in .whl/ first (docs/benchmarks.md,
# "The GPU check"): they and codelm are installed into a scratch folder, nothing else changes.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/results}
mkdir -p "$out"
python=${PYTHON:-python3}
site=$(mktemp -d)
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$site" .whl/*.whl
fi
"$python" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --upgrade \
    --target "$site" .
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
"$python" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
    torch.cuda.get_device_name() if torch.cuda.is_available() else "")'
# The tests import the installed codelm; -p no:cacheprovider keeps the tree as it is.
"$python" -m pytest -q -p no:cacheprovider -m cuda tests/quant tests/engine \
    --junitxml="$out/gpu_tests.xml" || echo "CUDA tests failed (above)"
# Each quant with its decode step as a CUDA graph and module by module (GRAPHS="on" halves it).
# shellcheck disable=SC2086
"$python" benchmarks/random_llama.py --shape "${SHAPE:-7b}" --quant ${QUANTS:-int4 int8 bf16} \
    --cuda-graphs ${GRAPHS:-on off} --json "$out/random_llama.json"
