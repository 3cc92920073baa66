"""The compiled fake_quantize op (QAT's forward) against its PyTorch twin, bit for bit, on both CPU paths and (with a
GPU) CUDA; its scale observation in place, the torch.library contract, bad input."""
import copy

import pytest
import torch
from torch import nn

from lightning_spec.ops import active_implementation, fake_quantize, reference
from lightning_spec.quant import FakeQuantLinear
from lightning_spec.quant.fake import OBSERVE

from cpu_paths import use_cpu_path

# (scheme, group_size, K): per-row K with a 16-lane tail, groups of every size
CASES = [("int8", None, 100), ("w8a8", None, 576), ("int4", 32, 96), ("int4", 64, 576), ("int4", 128, 256),
         ("int4_asym", 32, 96), ("int4_asym", 128, 256)]


@pytest.fixture(params=["auto", "generic"])
def isa(request, monkeypatch):
    """Both CPU paths: the best one this machine has, and plain C++."""
    return use_cpu_path(request.param, monkeypatch)


def hard_input(rows, K, seed=0, device="cpu"):
    """Weights with exact ties (k + 0.5 steps round half to even), values past the clamp, an all-zero row, -0.0."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, K, generator=g) * torch.rand(rows, 1, generator=g) * 3
    x[0] = 0.0
    x[1, ::3] = -0.0
    x[2] = (torch.arange(K) % 17 - 8).float() * 0.25 + 0.125  # many exact .5 quotients once s is a power of two
    return x.to(device)


def qparams(x, scheme, group):
    rows, K = x.shape
    scale = torch.empty(rows, K // group if group else 1, device=x.device)
    zero = torch.empty_like(scale) if scheme == "int4_asym" else None
    return scale, zero


def test_compiled_op_is_in_use():
    assert active_implementation("fake_quantize") == "compiled"


@pytest.mark.parametrize("scheme,group,K", CASES)
@pytest.mark.parametrize("rows", [3, 64])
def test_observe_matches_reference(isa, scheme, group, K, rows):
    x = hard_input(rows, K, seed=rows + K)
    scale, zero = qparams(x, scheme, group)
    ref_scale, ref_zero = qparams(x, scheme, group)
    out, inside = fake_quantize(x, scale, zero, scheme=scheme, group_size=group, observe=True)
    want, want_inside = reference.fake_quantize(x, ref_scale, ref_zero, scheme=scheme, group_size=group, observe=True)
    assert torch.equal(scale, ref_scale) and (zero is None or torch.equal(zero, ref_zero))
    assert torch.equal(out, want) and torch.equal(out.signbit(), want.signbit())
    assert torch.equal(inside, want_inside) and inside.dtype == torch.bool
    assert torch.equal(out[0], torch.zeros(K))


@pytest.mark.parametrize("scheme,group,K", CASES)
def test_observed_nan_gives_nan_qparams_like_the_reference(isa, scheme, group, K):
    """A NaN weight (a diverged step) makes its group's scale and zero NaN, as torch's amin/amax do, on every path;
    the SIMD min/max alone would skip it and hide the NaN behind a finite scale."""
    x = hard_input(8, K, seed=K)
    x[3, K - 1] = float("nan")  # in a masked tail lane where K has one
    x[4, 0] = float("nan")
    want_scale, want_zero = qparams(x, scheme, group)
    want, want_inside = reference.fake_quantize(x, want_scale, want_zero, scheme=scheme, group_size=group, observe=True)
    assert want_scale[3].isnan().any() and want_scale[4].isnan().any()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        scale, zero = qparams(x.to(device), scheme, group)
        out, inside = fake_quantize(x.to(device), scale, zero, scheme=scheme, group_size=group, observe=True)
        for got, expected in ((scale, want_scale), (zero, want_zero), (out, want), (inside, want_inside)):
            if expected is not None:
                torch.testing.assert_close(got.cpu(), expected, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("scheme,group,K", CASES)
def test_given_scales_clip_like_the_reference(isa, scheme, group, K):
    """Scales smaller than observed (as learned ones can be) make the clamp bite: inside marks where it did not."""
    x = hard_input(16, K, seed=K)
    scale, zero = qparams(x, scheme, group)
    reference.fake_quantize(x, scale, zero, scheme=scheme, group_size=group, observe=True)
    scale.mul_(0.5 + torch.rand(scale.shape, generator=torch.Generator().manual_seed(1)))
    if zero is not None:
        zero.copy_(torch.randint(0, 16, zero.shape).float())
    before = scale.clone()
    out, inside = fake_quantize(x, scale, zero, scheme=scheme, group_size=group)
    want, want_inside = reference.fake_quantize(x, scale, zero, scheme=scheme, group_size=group)
    assert torch.equal(scale, before)  # not observing: the scales are read only
    assert torch.equal(out, want) and torch.equal(inside, want_inside)
    assert 0 < int(inside.sum()) < inside.numel()


def test_torch_library_contract():
    """Schema (scale and zero mutated in place), fake impl for torch.compile, dispatch: torch.library.opcheck."""
    x = hard_input(8, 64)
    for scheme, group in (("int4", 32), ("int4_asym", 32), ("int8", 0)):
        scale, zero = qparams(x, scheme, group)
        torch.library.opcheck(torch.ops.lightning_spec.fake_quantize.default, (x, scale, zero, scheme, group, True))


def test_fake_quant_layer_compiles_forward_and_backward():
    """A FakeQuantLinear (int4 weights observed in place, int8 activations) under torch.compile(fullgraph=True): the
    same output, gradients and observed scales as eager."""
    torch.manual_seed(0)
    eager = FakeQuantLinear.from_linear(nn.Linear(64, 32), weight="int4", group_size=32, activation="int8")
    eager.set_phase(OBSERVE)
    twin = copy.deepcopy(eager)
    x = torch.randn(4, 64)
    want = eager(x)
    want.sum().backward()
    got = torch.compile(twin, fullgraph=True, backend="aot_eager")(x)
    got.sum().backward()
    assert torch.equal(got, want) and torch.equal(twin.weight.grad, eager.weight.grad)
    assert torch.equal(twin.weight_scale, eager.weight_scale) and not bool((twin.weight_scale == 1).all())


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(scheme="fp8"), "unknown quantization scheme"),
        (dict(scheme="int4", group_size=48), "group_size"),
        (dict(scheme="int8", group_size=32), "per output channel"),
        (dict(scheme="int4", group_size=32, scale=torch.empty(8, 3)), "scale must be"),
        (dict(scheme="int4_asym", group_size=32), "needs zero"),
        (dict(scheme="int4", group_size=32, zero=torch.empty(8, 2)), "zero must be None"),
        (dict(scheme="int4", group_size=32, input=torch.randn(8, 64).double()), "input must be a float32"),
    ],
)
def test_bad_input_is_named(kwargs, match):
    args = dict(input=torch.randn(8, 64), scale=torch.empty(8, 2), zero=None, group_size=None, observe=True)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        fake_quantize(args.pop("input"), args.pop("scale"), args.pop("zero"), **args)


def test_compiled_kernel_checks_too():
    x = torch.randn(8, 64)
    with pytest.raises(RuntimeError, match="scale must be float32 \\[8, 2\\]"):
        torch.ops.lightning_spec.fake_quantize(x, torch.empty(8, 3), None, "int4", 32, True)
    with pytest.raises(RuntimeError, match="int4_asym needs zero"):
        torch.ops.lightning_spec.fake_quantize(x, torch.empty(8, 2), None, "int4_asym", 32, True)
    with pytest.raises(RuntimeError, match="not divisible by group_size"):
        torch.ops.lightning_spec.fake_quantize(torch.randn(8, 80), torch.empty(8, 2), None, "int4", 32, True)
    with pytest.raises(RuntimeError, match="contiguous"):
        torch.ops.lightning_spec.fake_quantize(x, torch.empty(2, 8).t(), None, "int4", 32, True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("scheme,group,K", CASES)
@pytest.mark.parametrize("observe", [True, False])
def test_cuda_matches_reference(scheme, group, K, observe):
    x = hard_input(64, K, seed=K)
    scale, zero = qparams(x, scheme, group)
    reference.fake_quantize(x, scale, zero, scheme=scheme, group_size=group, observe=True)
    if not observe:
        scale.mul_(0.7)
    want_scale, want_zero = scale.clone(), zero.clone() if zero is not None else None
    want, want_inside = reference.fake_quantize(x, want_scale, want_zero, scheme=scheme, group_size=group, observe=observe)
    cuda = [t.cuda() if t is not None else None for t in (x, scale, zero)]
    out, inside = fake_quantize(*cuda, scheme=scheme, group_size=group, observe=observe)
    assert torch.equal(out.cpu(), want) and torch.equal(inside.cpu(), want_inside)
    assert torch.equal(cuda[1].cpu(), want_scale)
