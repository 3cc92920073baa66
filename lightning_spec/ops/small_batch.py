"""small_batch_linear on the compiled op lightning_spec::small_batch_linear (CPU, float32, decode and verification
batches of at most MAX_ROWS rows)."""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_spec.ops import _extension  # noqa: F401  (registers torch.ops.lightning_spec)

MAX_ROWS = 16


def small_batch_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``F.linear(x, weight, bias)``. CPU float32 inputs of at most 16 rows (``x.numel() // K``) without autograd run
    the compiled kernel, which streams each weight row once for all rows (ATen's GEMM costs 2-3x its one-row time
    at 2-8 rows on the build machine) and computes each row independently of the others, bit for bit; anything
    else (more rows, other dtypes or devices, training) is ``F.linear``.

    Example::

        logits = small_batch_linear(hidden[:, -5:], model.lm_head.weight)  # a 5-token verification
    """
    tracked = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad))
    if (
        not tracked and x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32 and weight.dim() == 2
        and x.dim() >= 1 and x.shape[-1] == weight.shape[1] and 0 < x.numel() <= MAX_ROWS * weight.shape[1]
        and (bias is None or bias.dtype == torch.float32)
    ):
        return torch.ops.lightning_spec.small_batch_linear(x, weight, bias)
    return F.linear(x, weight, bias)


@torch.library.register_fake("lightning_spec::small_batch_linear")
def _small_batch_linear_fake(x, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))
