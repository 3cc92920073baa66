#!/usr/bin/env bash
# The CUDA path in one go, for a GPU machine (<= 8 minutes on an H100): build the extension with its CUDA kernel,
# run the op tests there (CPU and CUDA; verify_tree on CUDA must equal CPU bit for bit, quantized_linear must match
# its float64 reference, fake_quantize its PyTorch twin bit for bit) and the decoding engine's CUDA tests (greedy
# equal to generate, lossless sampling), and benchmark verify_tree, quantized_linear
# (GB/s, speedup over bf16) and fake_quantize on the GPU.
# The benchmarks run even when a test fails; the script then exits with pytest's status.
# Needs a CUDA build of torch and the package's Python dependencies already installed (a machine without network
# can take them as wheels: benchmarks/gpu_wheels.sh fetches those the lent H200's image lacks, and says how to
# install them there). Usage: bash benchmarks/gpu_check.sh [python]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the benchmarks import the in-place build
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('torch', torch.__version__, torch.cuda.get_device_name())"
start=$(date +%s)
MAX_JOBS=${MAX_JOBS:-16} "$PY" setup.py -q build_ext --inplace
echo "build: $(( $(date +%s) - start )) s"
"$PY" -c "import torch, lightning_spec.ops as o; assert torch._C._dispatch_has_kernel_for_dispatch_key('lightning_spec::verify_tree', 'CUDA'), 'the extension has no CUDA kernel'; print('extension', o.extension_path())"
tests=0
parallel=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 8" || true)  # pytest-xdist, where installed
op_tests="tests/test_verify_ops.py tests/test_quant.py tests/test_fake_quant_op.py tests/test_small_batch_linear.py tests/test_cuda_build.py"
# The CUDA tests first (what only this machine can run), then the rest of the op tests.
CI=true "$PY" -m pytest -q -p no:cacheprovider -rfE $parallel -k cuda $op_tests tests/test_decoding.py || tests=$?
echo "CUDA tests: $(( $(date +%s) - start )) s"
CI=true "$PY" -m pytest -q -p no:cacheprovider -rfE $parallel -k "not cuda" -m "not slow" $op_tests || tests=$?
echo "all tests: $(( $(date +%s) - start )) s"
"$PY" benchmarks/bench_verify.py --device cuda --repeats 50
"$PY" benchmarks/bench_qmatmul.py --device cuda --repeats 100 --m 1 8
"$PY" benchmarks/bench_fake_quant.py --device cuda --repeats 10
echo "total: $(( $(date +%s) - start )) s"
exit $tests
