#!/usr/bin/env bash
# Run here (with network), before a GPU session's one device call: fetches into .whl/ (git-ignored) the wheels that
# gpu_check.sh needs and the GPU machine's image lacks or holds too old (its Python is 3.12, with torch, lightning,
# torchmetrics, hypothesis and pytest-xdist; transformers 5.17 predates the engine's `cache=`; no datasets, no gguf).
# ~15 MB. Then, on the device, carry .whl and run:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
#     && PYTHONPATH=/tmp/site bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  transformers==5.24.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 gguf==0.19.0
ls -la .whl
