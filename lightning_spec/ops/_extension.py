"""Loads the compiled extension lightning_spec._C, which registers the torch.ops.lightning_spec operators.

There is no silent fallback to Python: without the build, importing lightning_spec.ops fails and says how to
build. The pure-PyTorch twins live in lightning_spec.ops.reference, for tests and reading.
"""
from pathlib import Path

import torch  # loads libtorch, which the extension links against

BUILD_HINT = "build it with `pip install --no-build-isolation -e .` (or `make setup`) from the repository root"

try:
    from lightning_spec import _C
except ImportError as error:
    raise ImportError(
        f"lightning_spec's compiled ops (lightning_spec._C) are not built or failed to load: {error}; {BUILD_HINT}"
    ) from error


def extension_path() -> Path:
    """The shared library that implements torch.ops.lightning_spec (the ops in use)."""
    return Path(_C.__file__)


def active_implementation(op: str = "verify_tree") -> str:
    """'compiled' when torch.ops.lightning_spec.<op> has a kernel from the extension (always, once imported)."""
    has_kernel = torch._C._dispatch_has_kernel_for_dispatch_key(f"lightning_spec::{op}", "CPU")
    return "compiled" if has_kernel else "missing"
