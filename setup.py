"""Builds lightning_spec._C (csrc/); the package metadata lives in pyproject.toml.

CPU always; the CUDA kernel too when torch is a CUDA build and CUDA_HOME is found. Exact float semantics:
no FMA contraction, so the kernels agree bit for bit with lightning_spec/ops/reference.py.
"""
from pathlib import Path

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

CSRC = Path("csrc")
CXX_FLAGS = ["-O3", "-fopenmp", "-ffp-contract=off"]  # the C++ standard is torch's (C++20)
sources = [str(CSRC / f) for f in ("ops.cpp", "verify.cpp", "qmatmul.cpp", "qmatmul_amx.cpp", "fake_quant.cpp", "small_batch_linear.cpp")]

if torch.cuda.is_available() and CUDA_HOME is not None:
    extension = CUDAExtension(
        "lightning_spec._C",
        sources + [str(CSRC / f) for f in ("verify_cuda.cpp", "verify_kernels.cu", "qmatmul_cuda.cpp", "qmatmul_kernels.cu", "fake_quant_cuda.cpp", "fake_quant_kernels.cu")],
        define_macros=[("LIGHTNING_SPEC_WITH_CUDA", None)],
        extra_compile_args={"cxx": CXX_FLAGS, "nvcc": ["-O3", "--fmad=false"]},
        extra_link_args=["-lgomp"],
    )
else:
    extension = CppExtension("lightning_spec._C", sources, extra_compile_args=CXX_FLAGS, extra_link_args=["-lgomp"])

setup(ext_modules=[extension], cmdclass={"build_ext": BuildExtension})
