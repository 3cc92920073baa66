"""SmallBatchLinear: the nn.Linear of a model that decodes on CPU, on the compiled small-batch kernel."""
from torch import Tensor, nn

from lightning_spec.ops import small_batch_linear


class SmallBatchLinear(nn.Linear):
    """An ``nn.Linear`` whose forward is :func:`lightning_spec.ops.small_batch_linear`: decode steps and
    verification batches (up to 16 rows, CPU, float32, no autograd) stream the weight once, so verifying k tokens
    costs about one decode step and gives each row bit for bit the result it gets alone; prefill and training
    stay on ``F.linear``. Same parameters and ``state_dict`` as the ``nn.Linear`` it replaces."""

    def forward(self, input: Tensor) -> Tensor:
        return small_batch_linear(input, self.weight, self.bias)


def use_small_batch_linear(model: nn.Module) -> int:
    """Turn every plain ``nn.Linear`` of ``model`` into a :class:`SmallBatchLinear`, in place (the same module
    objects, parameters, ties and hooks; quantized or other Linear subclasses are left alone). Returns how many.

    Example::

        use_small_batch_linear(target), use_small_batch_linear(draft)
        out = speculative_generate(target, draft, input_ids, 64, gamma=4)
    """
    swapped = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = SmallBatchLinear
            swapped += 1
    return swapped
