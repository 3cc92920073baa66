"""The CUDA sources compile here, where there is no GPU: kernels with nvcc, the ATen host wrappers with g++ in
syntax-only mode (a CUDA build of torch builds them for real, on a GPU machine: benchmarks/gpu_check.sh)."""
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parents[1] / "csrc"
CUDA_INCLUDE = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "include"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
@pytest.mark.parametrize("source", ["verify_kernels.cu", "qmatmul_kernels.cu", "fake_quant_kernels.cu"])
def test_cuda_kernel_compiles(tmp_path, source):
    start = time.monotonic()
    out = tmp_path / f"{source}.o"
    command = ["nvcc", "-c", "-std=c++17", "-arch=sm_90a", "--fmad=false", str(CSRC / source), "-o", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert out.stat().st_size > 0
    assert time.monotonic() - start < 60


@pytest.mark.skipif(not (CUDA_INCLUDE / "cuda_runtime.h").is_file(), reason="no CUDA toolkit headers")
@pytest.mark.parametrize("source", ["verify_cuda.cpp", "qmatmul_cuda.cpp", "fake_quant_cuda.cpp"])
def test_cuda_host_wrapper_compiles(tmp_path, source):
    from torch.utils.cpp_extension import include_paths

    # The CPU wheel ships c10/cuda headers but not this generated one; its macros only matter for linking.
    shim = tmp_path / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    shim.parent.mkdir(parents=True)
    shim.touch()
    includes = [f"-I{p}" for p in [tmp_path, *include_paths(), CUDA_INCLUDE]]
    command = ["g++", "-std=c++20", "-fsyntax-only", "-DLIGHTNING_SPEC_WITH_CUDA", *includes, str(CSRC / source)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
