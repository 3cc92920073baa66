"""Quantization numerics, the compiled quantized_linear against its float64 reference (both CPU paths), QuantizedLinear,
quantize_model, torch.compile, bad input."""
import os

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_spec.decoding import target_generate
from lightning_spec.ops import active_implementation, quantized_linear, reference
from lightning_spec.quant import QuantizedLinear, dequantize_weight, fake_quantize_weight, prepare_qat, quantize_model, quantize_weight
from lightning_spec.quant.numerics import quantize_codes

from cpu_paths import use_cpu_path

SCHEMES = [("int8", None), ("int4", 32), ("int4", 64), ("int4", 128), ("int4_asym", 32), ("int4_asym", 128), ("w8a8", None)]


@pytest.fixture(params=["auto", "avx512_vnni", "avx512", "avx2", "generic"])
def isa(request, monkeypatch):
    """Every CPU path this machine can run: the best one (AMX at 3-16 rows where the CPU has it), AVX-512 with VNNI,
    without it, AVX2, plain C++."""
    return use_cpu_path(request.param, monkeypatch)


def close(got, want, K):
    torch.testing.assert_close(got.double(), want.double(), rtol=2e-4, atol=2e-5 * K**0.5)


def test_compiled_op_is_in_use():
    assert active_implementation("quantized_linear") == "compiled"
    assert torch.ops.lightning_spec.qmatmul_cpu_isa() in ("amx", "avx512_vnni", "avx512", "avx2", "generic")


def test_ci_takes_amx_where_the_cpu_has_it():
    """In CI, a CPU that lists AMX (and the AVX-512 features its path uses) must run it: a failed permission request
    or a wrong feature check would otherwise drop every AMX test to a skip and the kernels to a slower path."""
    if os.environ.get("CI") != "true" or not os.path.exists("/proc/cpuinfo"):
        pytest.skip("checked in CI on Linux")
    flags = set(open("/proc/cpuinfo").read().split())
    if not {"amx_tile", "amx_bf16", "amx_int8", "avx512_bf16", "avx512vbmi", "avx512_vnni"} <= flags:
        pytest.skip("no AMX on this CPU")
    assert torch.ops.lightning_spec.qmatmul_cpu_isa() == "amx"


@pytest.mark.parametrize("scheme,group", SCHEMES)
def test_numerics(scheme, group):
    w = torch.randn(48, 256) * torch.rand(48, 1) * 3
    w[0] = 0  # an all-zero channel comes back as zeros
    packed, scales, zeros = quantize_weight(w, scheme, group)
    deq = dequantize_weight(packed, scales, zeros, scheme=scheme, group_size=group)
    assert torch.equal(deq, fake_quantize_weight(w, scheme, group))
    assert torch.equal(deq[0], torch.zeros(256))
    q, _, _ = quantize_codes(w, scheme, group)
    lo, hi = {"int8": (-128, 127), "w8a8": (-128, 127), "int4": (-8, 7), "int4_asym": (0, 15)}[scheme]
    assert q.min() >= lo and q.max() <= hi
    step = scales if scales.dim() == 1 else scales.repeat_interleave(group, dim=1)
    assert ((deq - w).abs() <= (step[:, None] if step.dim() == 1 else step) * 0.5 + 1e-6).all()  # nothing clipped


@pytest.mark.parametrize("scheme,group", SCHEMES)
def test_dequantize_is_the_exact_inverse_on_the_grid(scheme, group):
    """A dequantized weight quantizes back to the same codes, scales and zero points, bit for bit, at any magnitude."""
    w = torch.randn(64, 256, dtype=torch.float64) * torch.logspace(-30, 30, 64, dtype=torch.float64)[:, None]
    w[1], w[2] = w[1].abs(), -w[2].abs()  # one-signed channels: the zero point's and the clamp's edge
    w = w.float()
    packed, scales, zeros = quantize_weight(w, scheme, group)
    grid = dequantize_weight(packed, scales, zeros, scheme=scheme, group_size=group)
    again = quantize_weight(grid, scheme, group)
    assert torch.equal(again[0], packed) and torch.equal(again[1], scales)
    assert zeros is None or torch.equal(again[2], zeros)
    assert torch.equal(dequantize_weight(*again, scheme=scheme, group_size=group), grid)
    assert torch.equal(fake_quantize_weight(grid, scheme, group), grid)  # the QAT observer sees the same grid


@pytest.mark.parametrize("scheme,group", SCHEMES)
@pytest.mark.parametrize("M", [1, 3, 8, 64, 512])
@pytest.mark.parametrize("N,K", [(576, 576), (1536, 576), (576, 1536), (37, 4096)])
def test_matches_reference(isa, scheme, group, M, N, K):
    if isa != "auto" and M * N * K > 2e8:
        pytest.skip("the capped paths are checked on the smaller problems")
    if group and K % group:
        pytest.skip(f"K={K} is not a multiple of group {group} (its error is tested below)")
    g = torch.Generator().manual_seed(M + N + K)
    w, x, bias = torch.randn(N, K, generator=g) * 0.05, torch.randn(M, K, generator=g), torch.randn(N, generator=g)
    packed, scales, zeros = quantize_weight(w, scheme, group)
    for b in (None, bias):
        got = quantized_linear(x, packed, scales, zeros, scheme=scheme, group_size=group, bias=b)
        close(got, reference.quantized_linear(x, packed, scales, zeros, scheme=scheme, group_size=group, bias=b), K)


@pytest.mark.parametrize("scheme,group", SCHEMES)
def test_big_vocabulary_head_odd_sizes_views_and_bf16(isa, scheme, group):
    g = torch.Generator().manual_seed(1)
    K = 96 if group in (None, 32) else 2 * group  # int8: a K with a 16-lane tail
    K = 100 if scheme in ("int8", "w8a8") else K
    for N, M in [(49152, 1), (49152, 3), (7, 5)]:
        w, x = torch.randn(N, K, generator=g) * 0.05, torch.randn(K, M, generator=g).t()  # non-contiguous x
        packed, scales, zeros = quantize_weight(w, scheme, group)
        close(quantized_linear(x, packed, scales, zeros, scheme=scheme, group_size=group),
              reference.quantized_linear(x, packed, scales, zeros, scheme=scheme, group_size=group), K)
    xb = torch.randn(2, 3, K, generator=g).bfloat16()  # batched, bf16
    got = quantized_linear(xb, packed, scales, zeros, scheme=scheme, group_size=group)
    want = reference.quantized_linear(xb, packed, scales, zeros, scheme=scheme, group_size=group)
    assert got.dtype == torch.bfloat16 and got.shape == (2, 3, 7)
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("scheme", ["int4", "int4_asym"])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_every_tail_and_tile(isa, scheme, group):
    """K with 0-3 chunks past its last 128 inputs (two: two channels' tails share a vector on VNNI), channel counts
    that leave single-channel tiles, and M on both sides of the VNNI path's row limit."""
    g = torch.Generator().manual_seed(group)
    for K in [k for k in (32, 64, 96, 128, 160, 576, 608, 1536) if k % group == 0]:
        for N, M in [(1, 1), (6, 1), (9, 2), (13, 3), (8, 5)]:
            w, x = torch.randn(N, K, generator=g) * 0.05, torch.randn(M, K, generator=g)
            x[:, 0] *= 30  # an outlier input, as in LLM activations
            packed, scales, zeros = quantize_weight(w, scheme, group)
            close(quantized_linear(x, packed, scales, zeros, scheme=scheme, group_size=group),
                  reference.quantized_linear(x, packed, scales, zeros, scheme=scheme, group_size=group), K)


@pytest.mark.parametrize("scheme,group", [("int8", None), ("w8a8", None), ("int4", 32), ("int4_asym", 64)])
def test_long_rows_take_eight_channel_tiles(isa, scheme, group):
    """Rows of 2 KB or more at 1-3 rows: 8-channel tiles (AVX-512), then 4- and 1-channel ones for the rest of N, with
    every tail of K (int4 on VNNI: 1-3 chunks past the last 128 inputs, two of them shared by channel pairs)."""
    g = torch.Generator().manual_seed(11)
    for K in ([2048 + 5, 4096] if group is None else [4096 + 32, 4096 + 64, 4096 + 96]):
        if group and K % group:
            continue
        for M in (1, 2, 3):
            w, x = torch.randn(21, K, generator=g) * 0.05, torch.randn(M, K, generator=g)
            packed, scales, zeros = quantize_weight(w, scheme, group)
            close(quantized_linear(x, packed, scales, zeros, scheme=scheme, group_size=group),
                  reference.quantized_linear(x, packed, scales, zeros, scheme=scheme, group_size=group), K)


def test_int8_eight_row_tiles(isa):
    """int8 with 8+ rows of a short x takes 2 x 8 tiles, the rows past a multiple of 8 and odd channels the usual ones."""
    g = torch.Generator().manual_seed(8)
    for M in (8, 11, 16):
        w, x = torch.randn(6, 576, generator=g) * 0.05, torch.randn(M, 576, generator=g)
        packed, scales, _ = quantize_weight(w, "int8")
        close(quantized_linear(x, packed, scales, scheme="int8"),
              reference.quantized_linear(x, packed, scales, scheme="int8"), 576)


def test_int4_fixed_point_error_is_bounded():
    """On VNNI, int4 at M <= 2 reads x in 22-bit block fixed point: each input off by at most half a unit,
    2^(e - 23) with |x| < 2^e over its 32-input chunk; the result within that (and float32 rounding) of float64."""
    if torch.ops.lightning_spec.qmatmul_cpu_isa() not in ("avx512_vnni", "amx"):
        pytest.skip("no AVX-512 VNNI on this CPU")
    g = torch.Generator().manual_seed(0)
    K, N = 576, 1536
    w = torch.randn(N, K, generator=g) * 0.05
    x = torch.randn(2, K, generator=g) * torch.logspace(-3, 3, K)[torch.randperm(K, generator=g)]  # wide range
    packed, scales, zeros = quantize_weight(w, "int4", 32)
    weight = dequantize_weight(packed, scales, zeros, scheme="int4", group_size=32).double()
    exponent = torch.frexp(x.abs().reshape(2, -1, 32).amax(-1))[1].double()
    half_unit = torch.exp2(exponent - 23).repeat_interleave(32, dim=1)
    bound = half_unit @ weight.abs().T + 1e-6 * x.double().abs() @ weight.abs().T
    error = (quantized_linear(x, packed, scales, scheme="int4", group_size=32).double() - x.double() @ weight.T).abs()
    assert (error <= bound).all()
    assert error.max() > 0  # it is not the float path


def test_int4_non_finite_x_is_not_hidden(isa):
    """A row with inf or NaN cannot be fixed point (VNNI) or zero-point corrected after the fact (AVX2): it takes a
    kernel that multiplies the dequantized weights, and inf and NaN come out where float64 has them."""
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(64, 256, generator=g), torch.randn(2, 256, generator=g)
    x[0, 7] = float("inf")
    for scheme in ("int4", "int4_asym"):
        packed, scales, zeros = quantize_weight(w, scheme, 32)
        got = quantized_linear(x, packed, scales, zeros, scheme=scheme, group_size=32)
        want = reference.quantized_linear(x, packed, scales, zeros, scheme=scheme, group_size=32)
        assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf())
        torch.testing.assert_close(got[1], want[1], rtol=2e-4, atol=2e-5 * 16)
    x[1, 3] = float("nan")
    assert quantized_linear(x, packed, scales, zeros, scheme=scheme, group_size=32)[1].isnan().all()


def test_int8_holds_huge_inputs(isa):
    """int8's SIMD tiles scale the sum of x * code once per channel: a row with |x| >= 2^100, whose sum could overflow
    there, is computed from the dequantized weight instead, finite like float64's. AMX's fixed-point rows (1-4) scale
    x to its largest |x| and stay finite too, within half a fixed-point unit per input (test_amx_int8_fixed_point_rows)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 256, generator=g) * 0.05
    packed, scales, _ = quantize_weight(w, "int8")
    weight = dequantize_weight(packed, scales, None, scheme="int8").double()
    for M in (1, 3, 8):
        x = torch.randn(M, 256, generator=g)
        x[0, 10] = 3e37
        got = quantized_linear(x, packed, scales, scheme="int8").double()
        assert got.isfinite().all()
        bound = 1e-5 * x.double().abs() @ weight.abs().T
        if torch.ops.lightning_spec.qmatmul_cpu_isa() == "amx" and M <= 4:
            half_unit = torch.exp2(torch.frexp(x.abs().amax(1))[1].double() - 31)
            bound += half_unit.unsqueeze(1) * weight.abs().sum(1)
        assert ((got - x.double() @ weight.T).abs() <= bound).all()


@pytest.mark.parametrize("scheme", ["int4", "int4_asym"])
def test_int4_float_paths_hold_outliers_and_huge_inputs(isa, scheme):
    """The float int4 kernels multiply x by each weight's dequantized value (c - z) * s, as float64 does: an input
    near float32's limit does not overflow, an outlier does not cancel against a zero-point correction, and an
    all-zero channel gives exactly 0. (VNNI's fixed-point rows, M <= 2: test_int4_fixed_point_error_is_bounded.)"""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 256, generator=g) * 0.05
    w[5] = 0
    packed, scales, zeros = quantize_weight(w, scheme, 32)
    weight = dequantize_weight(packed, scales, zeros, scheme=scheme, group_size=32).double()
    x = torch.randn(3, 256, generator=g)
    x[0, 10], x[1, 40] = 3e37, 1e5
    fixed_point_rows = torch.ops.lightning_spec.qmatmul_cpu_isa() in ("avx512_vnni", "amx")
    for rows in [x] if fixed_point_rows else [x, x[:1], x[1:2]]:
        got = quantized_linear(rows, packed, scales, zeros, scheme=scheme, group_size=32).double()
        assert got.isfinite().all() and (got[:, 5] == 0).all()
        assert ((got - rows.double() @ weight.T).abs() <= 1e-5 * rows.double().abs() @ weight.abs().T).all()


def test_w8a8_quantizes_few_rows_in_one_pass(isa):
    """At up to 16 rows, w8a8 quantizes its finite rows per token in one C++ pass; a row with a NaN sends the call to
    the ATen ops that quantize larger batches. Both give the same codes and scales: the other rows' outputs are equal
    bit for bit (zero, tiny, huge and ordinary rows, every CPU path)."""
    g = torch.Generator().manual_seed(17)
    for K in (5, 64, 576):
        for M in (1, 3, 8, 15):
            packed, scales, _ = quantize_weight(torch.randn(70, K, generator=g), "w8a8")
            x = torch.randn(M + 1, K, generator=g) * torch.logspace(-3, 3, M + 1).unsqueeze(1)
            x[0] = 1e-30
            if M > 2:
                x[1], x[2, 0] = 0, 3e38
            x[M, 1] = float("nan")
            assert torch.equal(quantized_linear(x[:M], packed, scales, scheme="w8a8"),
                               quantized_linear(x, packed, scales, scheme="w8a8")[:M])


def amx_only():
    if torch.ops.lightning_spec.qmatmul_cpu_isa() != "amx":
        pytest.skip("no AMX on this CPU")


@pytest.mark.parametrize("scheme,group", [("int8", None), ("w8a8", None), ("int4", 32), ("int4", 128), ("int4_asym", 64)])
def test_amx_tiles_and_tails(scheme, group):
    """AMX (int8 at 1-4 rows in fixed point and from 5 in bf16 parts, w8a8 from 3, int4 from 6, up to 16): channel
    steps past N, input blocks past K (int8, w8a8), groups spanning several blocks, rows on both sides of its limits."""
    amx_only()
    g = torch.Generator().manual_seed(7)
    for K in ([100, 576, 4096 + 40] if group is None else [group, 4 * group, 4096]):
        for N, M in [(1, 16), (17, 6), (40, 5), (33, 8), (300, 11), (20, 17), (1, 1), (31, 2), (34, 3), (70, 4)]:
            w, x = torch.randn(N, K, generator=g) * 0.05, torch.randn(M, K, generator=g)
            x[:, 1] *= 300  # an outlier input
            packed, scales, zeros = quantize_weight(w, scheme, group)
            close(quantized_linear(x, packed, scales, zeros, scheme=scheme, group_size=group),
                  reference.quantized_linear(x, packed, scales, zeros, scheme=scheme, group_size=group), K)


def test_amx_w8a8_is_the_streaming_kernels_bit_for_bit(monkeypatch):
    """w8a8 on AMX (3-16 rows) multiplies the packed int8 weight in place by x's int8 codes into int32: the same exact
    sums as the VNNI kernels, so the same floats, with channels past a 32-channel step and K past a 64-input block."""
    amx_only()
    g = torch.Generator().manual_seed(5)
    for K in (8, 63, 100, 576, 4096 + 36):
        for N, M in [(1, 3), (31, 16), (33, 4), (34, 5), (64, 8), (300, 11)]:
            w, x = torch.randn(N, K, generator=g) * 0.05, torch.randn(M, K, generator=g)
            packed, scales, _ = quantize_weight(w, "w8a8")
            monkeypatch.delenv("LIGHTNING_SPEC_QMATMUL_ISA", raising=False)
            got = quantized_linear(x, packed, scales, scheme="w8a8")
            monkeypatch.setenv("LIGHTNING_SPEC_QMATMUL_ISA", "avx512_vnni")
            assert torch.equal(got, quantized_linear(x, packed, scales, scheme="w8a8"))


def test_amx_int8_fixed_point_rows():
    """int8 at 1-4 rows multiplies the codes by x in fixed point, integer multiples of 2^(e - 30) where the row's
    largest |x| < 2^e, in exact integer sums: a row within 1/64 of its largest |x| is exact, so each output is the
    exact sum of codes * x, times the scale, correctly rounded (double rounding aside); a wide row's inputs move by at
    most half a multiple. Only K >= 2^17, whose int32 sums could overflow, is left to the float kernels."""
    amx_only()
    g = torch.Generator().manual_seed(11)
    K, N = 576, 300
    packed, scales, _ = quantize_weight(torch.randn(N, K, generator=g) * 0.05, "int8")
    exact = lambda x: (x.double() @ packed.double().T) * scales.double()  # noqa: E731  (int8's packed is its codes)
    for M in (1, 2, 3, 4):
        sign = torch.randint(0, 2, (M, K), generator=g) * 2 - 1
        x = sign * (1 + 63 * torch.rand(M, K, generator=g)) * torch.logspace(-30, 30, M).unsqueeze(1)
        want = exact(x)
        assert ((quantized_linear(x, packed, scales, scheme="int8").double() - want).abs() <= want.abs() * 2**-24).all()
        x = torch.randn(M, K, generator=g) * torch.logspace(-4, 4, K)[torch.randperm(K, generator=g)]  # wide
        half_unit = torch.exp2(torch.frexp(x.abs().amax(1))[1].double() - 31)
        bound = half_unit.unsqueeze(1) * (packed.double().abs() * scales.double().unsqueeze(1)).sum(1) + exact(x).abs() * 2**-24
        assert ((quantized_linear(x, packed, scales, scheme="int8").double() - exact(x)).abs() <= bound).all()
    K = 2**17
    packed, scales, _ = quantize_weight(torch.randn(3, K, generator=g), "int8")
    x = torch.randn(1, K, generator=g)
    close(quantized_linear(x, packed, scales, scheme="int8"), reference.quantized_linear(x, packed, scales, scheme="int8"), K)


@pytest.mark.parametrize("scheme,group", [("int8", None), ("int4", 32), ("int4_asym", 32)])
def test_amx_takes_all_of_x(scheme, group):
    """AMX multiplies the codes by x split into three bf16 parts that sum to x exactly: on positive sums (no
    cancellation) the result is float64's to float32 summation error (~1e-7), where dropping the third part would cost
    ~2^-17 and a bf16 x ~2^-9."""
    amx_only()
    g = torch.Generator().manual_seed(3)
    K, N = 256, 48
    w, x = torch.rand(N, K, generator=g) * 0.05, 1 + torch.rand(8, K, generator=g)  # full 24-bit significands
    packed, scales, zeros = quantize_weight(w, scheme, group)
    want = reference.quantized_linear(x, packed, scales, zeros, scheme=scheme, group_size=group).double()
    got = quantized_linear(x, packed, scales, zeros, scheme=scheme, group_size=group).double()
    assert ((got - want).abs() / want).max() < 2e-6


@pytest.mark.parametrize("scheme,group", [("int8", None), ("int4", 32), ("int4_asym", 32)])
def test_amx_leaves_non_finite_and_huge_x_to_the_float_kernels(scheme, group):
    """A row with inf or NaN, or an |x| >= 2^100, whose unscaled products could overflow where x * (c - z) * s does
    not, sends the call to the float kernels (int8: the dequantized weight): inf and NaN where float64 has them, the
    rest as float64."""
    amx_only()
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(64, 256, generator=g) * 0.05, torch.randn(8, 256, generator=g)
    packed, scales, zeros = quantize_weight(w, scheme, group)
    for row, value in [(1, float("inf")), (2, float("nan"))]:
        x[row, 3 * row + 1] = value
        got = quantized_linear(x, packed, scales, zeros, scheme=scheme, group_size=group)
        want = reference.quantized_linear(x, packed, scales, zeros, scheme=scheme, group_size=group)
        assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf())
        torch.testing.assert_close(got[3:], want[3:], rtol=2e-4, atol=2e-5 * 16)
        x[row, 3 * row + 1] = 0
    x[0, 1] = 3e37  # huge alone
    got = quantized_linear(x, packed, scales, zeros, scheme=scheme, group_size=group).double()
    weight = dequantize_weight(packed, scales, zeros, scheme=scheme, group_size=group).double()
    assert got.isfinite().all() and ((got - x.double() @ weight.T).abs() <= 1e-5 * x.double().abs() @ weight.abs().T).all()


@pytest.mark.parametrize("scheme,group", SCHEMES)
def test_quantized_linear_module(tmp_path, scheme, group):
    linear = torch.nn.Linear(128, 40)
    layer = QuantizedLinear.from_float(linear, scheme, group)
    x = torch.randn(4, 128)
    fake = F.linear(x, fake_quantize_weight(linear.weight.detach(), scheme, group), linear.bias)
    if scheme == "w8a8":
        fake = reference.quantized_linear(x, layer.packed, layer.scales, layer.zeros, scheme=scheme, bias=layer.bias)
    close(layer(x), fake, 128)
    torch.save(layer.state_dict(), tmp_path / "q.pt")
    fresh = QuantizedLinear(128, 40, scheme=scheme, group_size=group)
    fresh.load_state_dict(torch.load(tmp_path / "q.pt"))
    assert torch.equal(fresh(x), layer(x))
    assert all(k in layer.state_dict() for k in ("packed", "scales", "bias"))


def test_from_float_takes_a_linear():
    with pytest.raises(TypeError, match="linear must be a torch.nn.Linear, got Conv1d"):
        QuantizedLinear.from_float(torch.nn.Conv1d(64, 8, 1), "int8")


@pytest.mark.parametrize("saved,loaded", [
    (dict(scheme="int8"), dict(scheme="w8a8")),  # the same buffers, other numerics
    (dict(scheme="w8a8"), dict(scheme="int8")),
    (dict(scheme="int4", group_size=32), dict(scheme="int4", group_size=32, activation="int8")),
])
def test_state_dict_of_another_scheme_is_refused(saved, loaded):
    state = QuantizedLinear.from_float(torch.nn.Linear(64, 8), **saved).state_dict()
    with pytest.raises(ValueError, match="state_dict holds a layer quantized as"):
        QuantizedLinear(64, 8, **loaded).load_state_dict(state)


def tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


def test_quantize_model_report_and_patterns():
    model = tiny_llama()
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        before = model(ids).logits
    report = quantize_model(model, "int4", 32)
    assert len(report["quantized"]) == 14 and report["skipped"] == ["lm_head"]
    assert report["bytes_after"] < report["bytes_before"] / 5
    assert isinstance(model.model.layers[0].mlp.up_proj, QuantizedLinear) and isinstance(model.lm_head, torch.nn.Linear)
    with torch.no_grad():
        after = model(ids).logits
    assert (after.argmax(-1) == before.argmax(-1)).float().mean() > 0.5
    only_mlp = quantize_model(tiny_llama(), "int8", None, include=["mlp"], exclude=())
    assert only_mlp["quantized"] and all(".mlp." in n for n in only_mlp["quantized"])


@pytest.mark.parametrize("scheme,group", [("int4", 32), ("int4_asym", 32), ("w8a8", None)])
def test_quantized_model_compiles(scheme, group):
    model = tiny_llama()
    quantize_model(model, scheme, group)
    mlp = model.model.layers[0].mlp
    compiled = torch.compile(mlp, fullgraph=True, backend="aot_eager")
    x = torch.randn(1, 3, 64)
    with torch.no_grad():
        assert torch.allclose(compiled(x), mlp(x))
    x.requires_grad_()  # the backward (grad @ the dequantized weight) traces too: no data-dependent checks in it
    compiled(x).sum().backward()
    grad = x.grad.clone()
    x.grad = None
    mlp(x).sum().backward()
    torch.testing.assert_close(grad, x.grad)


def test_no_grad_calls_go_through_the_dispatcher():
    """A call that needs no gradient takes the op's direct binding, which still dispatches: fake and meta tensors get
    the fake implementation's shape and checks, as through torch.ops."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    packed, scales, _ = quantize_weight(torch.randn(64, 128), "int4", 32)
    with FakeTensorMode(allow_non_fake_inputs=True):
        assert quantized_linear(torch.empty(3, 128), packed, scales, scheme="int4", group_size=32).shape == (3, 64)
        with pytest.raises(ValueError, match="x has 100 input features"):
            quantized_linear(torch.empty(3, 100), packed, scales, scheme="int4", group_size=32)
    y = quantized_linear(torch.empty(2, 5, 128, device="meta"), packed.to("meta"), scales.to("meta"), scheme="int4", group_size=32)
    assert y.device.type == "meta" and y.shape == (2, 5, 64)


def test_bad_input_is_named_under_compile_too():
    """Tracing runs the fake implementation, which checks what the compiled op checks."""
    packed, scales, _ = quantize_weight(torch.randn(16, 128), "int4", 32)
    traced = torch.compile(lambda x: quantized_linear(x, packed, scales, scheme="int4", group_size=64), backend="aot_eager")
    with pytest.raises(RuntimeError, match="scales must be float32"):  # dynamo wraps the ValueError
        traced(torch.randn(2, 128))


def test_compiled_quantized_model_decodes_like_eager():
    """The README's recipe for fast CPU decoding: inductor, dynamic shapes, through the engine's growing cache."""
    model = tiny_llama()
    quantize_model(model, "int4", 32, exclude=())
    prompt = torch.randint(0, model.config.vocab_size, (2, 5))
    eager = target_generate(model, prompt, 12, eos_token_id=[]).tokens
    model.forward = torch.compile(model.forward, dynamic=True)
    assert torch.equal(target_generate(model, prompt, 12, eos_token_id=[]).tokens, eager)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda w, x: quantize_weight(w, "int3"), "unknown quantization scheme"),
        (lambda w, x: quantize_weight(w, "int4", 48), "group_size"),
        (lambda w, x: quantize_weight(w[:, :80], "int4", 64), "not divisible"),
        (lambda w, x: quantize_weight(w, "int8", 32), "group_size must be None"),
        (lambda w, x: quantized_linear(x, *quantize_weight(w, "int8"), scheme="int4", group_size=32), "packed for another scheme"),
        (lambda w, x: quantized_linear(x, *quantize_weight(w, "int4", 32), scheme="int4", group_size=64), "scales must be"),
        (lambda w, x: quantized_linear(x, *quantize_weight(w, "int4", 32)[:2], scheme="int4_asym", group_size=32), "needs zeros"),
        (lambda w, x: quantized_linear(x[:, :64], *quantize_weight(w, "int8"), scheme="int8"), "input features"),
        (lambda w, x: quantized_linear(x.double(), *quantize_weight(w, "int8"), scheme="int8"), "x must be"),
        (lambda w, x: quantized_linear(x, *quantize_weight(w, "int8"), scheme="int8", bias=torch.zeros(3)), "bias"),
        (lambda w, x: quantize_model(tiny_llama(), "int4", 32, include=["nothing_here"]), "matches no nn.Linear"),
        (lambda w, x: QuantizedLinear(100, 8, scheme="int4", group_size=32), "not divisible"),
        (lambda w, x: QuantizedLinear(128, 8, scheme="int8")(torch.ones(2, 128, dtype=torch.long)), "floating-point input"),
        (lambda w, x: quantize_weight(w[:, :0], "int8"), "no input features"),
        (lambda w, x: quantized_linear(x[:, :0], torch.zeros(16, 0, dtype=torch.int8), torch.ones(16), None, scheme="int8"), "K = 0"),
        (lambda w, x: torch.ops.lightning_spec.quantized_linear(x[:, :0], torch.zeros(16, 0, dtype=torch.int8), torch.ones(16), None, "int8", 0, None), "K = 0"),
        (lambda w, x: quantize_weight(w, "int4", 32.0), "group_size"),
        (lambda w, x: quantized_linear(torch.ones(1, 2**17), torch.ones(2, 2**17, dtype=torch.int8), torch.ones(2), None, scheme="w8a8"), "at most 131071"),
        (lambda w, x: quantized_linear(x, *quantize_weight(w, "int4_asym", 32)[:2], torch.full((16, 4), 16, dtype=torch.uint8), scheme="int4_asym", group_size=32), r"\[0, 15\]"),
        (lambda w, x: quantized_linear(x, *quantize_weight(w, "int8"), scheme="int8", bias=torch.zeros(16, dtype=torch.long)), "floating-point"),
        (lambda w, x: quantize_weight(w.index_fill(1, torch.tensor([3]), float("nan")), "int4", 32), "inf or NaN"),
        (lambda w, x: quantize_weight(torch.cat([w[:, :1] * 0 + 3e38, w[:, :1] * 0 - 3e38, w[:, 2:]], 1), "int4_asym", 32), "overflows"),
        (lambda w, x: quantize_weight(w, "int4", 32, torch.ones(4, 16)), r"scales must be \[16, 4\]"),
        (lambda w, x: quantize_weight(w, "int4_asym", 32, torch.ones(16, 4), torch.full((16, 4), 16.0)), r"\[0, 15\]"),
        (lambda w, x: dequantize_weight(*quantize_weight(w, "int4_asym", 32)[:2], torch.full((16, 4), 16, dtype=torch.uint8), scheme="int4_asym", group_size=32), r"\[0, 15\]"),
        (lambda w, x: quantize_weight(w, "int8", None, -torch.ones(16)), "scales must be positive"),
        (lambda w, x: quantize_weight(w, "int8", None, torch.ones(16), torch.zeros(16)), "zeros go with int4_asym"),
    ],
)
def test_bad_input_is_named(call, match):
    w, x = torch.randn(16, 128), torch.randn(2, 128)
    with pytest.raises(ValueError, match=match):
        call(w, x)


def test_quantize_model_selects_by_scope_and_shares_and_skips_attention_projections():
    """A pattern naming a module selects the layers under it; the default exclude may match nothing; a layer under two
    names becomes one QuantizedLinear under both; nn.MultiheadAttention reads its projections' weights, so they stay."""
    report = quantize_model(model := tiny_llama(), "int8", None, exclude=["lm_head", "model.layers.0"])
    assert report["quantized"] and all(n.startswith("model.layers.1.") for n in report["quantized"])
    assert len(quantize_model(tiny_llama(), "int8", None, include=["model.layers.0"], exclude=())["quantized"]) == 7
    shared = torch.nn.Linear(32, 32)
    net = torch.nn.ModuleDict({"a": shared, "b": shared, "attn": torch.nn.MultiheadAttention(32, 4, batch_first=True)})
    report = quantize_model(net, "int8", None)  # no lm_head here
    assert report["quantized"] == ["a", "b"] and net["a"] is net["b"] and isinstance(net["a"], QuantizedLinear)
    assert report["skipped"] == ["attn.out_proj"] and type(net["attn"].out_proj) is not QuantizedLinear
    x = torch.randn(1, 3, 32)
    net["attn"](x, x, x)
    encoder = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(32, 4, 64, batch_first=True), 2).eval()
    assert quantize_model(encoder, "int8", None)["quantized"] == []  # its layers read linear1/linear2.weight
    with torch.no_grad():
        encoder(x)
    with pytest.raises(ValueError, match="matches no module"):
        quantize_model(tiny_llama(), "int8", None, exclude=["lm_haed"])
    prepare_qat(torch.nn.Sequential(torch.nn.Linear(32, 32)), "int8", None)  # default excludes, none of them present


def test_quantize_model_checks_every_layer_before_swapping_any():
    model = tiny_llama()
    model.model.layers[1].mlp.down_proj = torch.nn.Linear(100, 64)  # the group size does not divide 100
    with pytest.raises(ValueError, match="model.layers.1.mlp.down_proj"):
        quantize_model(model, "int4", 32)
    assert not any(isinstance(m, QuantizedLinear) for m in model.modules())
    assert quantize_model(tiny_llama(), "int8", None, include="mlp")["quantized"] == quantize_model(tiny_llama(), "int8", None, include=["mlp"])["quantized"]


@pytest.mark.parametrize("scheme,group", SCHEMES)
def test_gradients_flow_to_x_and_bias(scheme, group):
    """Adapters over a frozen quantized model: d/dx is grad @ the dequantized weight (straight through w8a8's
    activation rounding), d/dbias the summed grad; the packed weight and scales are constants."""
    packed, scales, zeros = quantize_weight(torch.randn(40, 128), scheme, group)
    weight = dequantize_weight(packed, scales, zeros, scheme=scheme, group_size=group)
    x, bias = torch.randn(2, 3, 128, requires_grad=True), torch.randn(40, requires_grad=True)
    y = quantized_linear(x, packed, scales, zeros, scheme=scheme, group_size=group, bias=bias)
    grad = torch.randn_like(y)
    y.backward(grad)
    torch.testing.assert_close(x.grad, grad @ weight)
    torch.testing.assert_close(bias.grad, grad.sum((0, 1)))
    with pytest.raises(RuntimeError, match="no gradient for scales"):
        quantized_linear(x, packed, scales.requires_grad_(), zeros, scheme=scheme, group_size=group).sum().backward()
    linear = torch.nn.Linear(128, 40)  # a Parameter's quantization is a constant: the gradient reaches x and bias only
    packed, scales, zeros = quantize_weight(linear.weight, scheme, group)
    assert not scales.requires_grad
    quantized_linear(x, packed, scales, zeros, scheme=scheme, group_size=group, bias=linear.bias).sum().backward()
    assert linear.bias.grad is not None and linear.weight.grad is None
    with torch.no_grad():  # nothing to differentiate: the call skips the autograd kernel, same numbers, no graph
        untracked = quantized_linear(x, packed, scales, zeros, scheme=scheme, group_size=group, bias=linear.bias)
    tracked = quantized_linear(x, packed, scales, zeros, scheme=scheme, group_size=group, bias=linear.bias)
    assert untracked.grad_fn is None and tracked.grad_fn is not None and torch.equal(untracked, tracked)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_cast_model_keeps_float32_scales(dtype):
    """model.to(dtype) (or a bf16-true precision plugin) casts weights and activations, not the quantization parameters."""
    ids = torch.randint(0, 256, (2, 9))
    quantized, fake = tiny_llama(), tiny_llama()
    quantize_model(quantized, "int4", 32)
    prepare_qat(fake, "int4_asym", 32, phase=2, learn_scales=True)
    for model in (quantized, fake):
        scales = {n: t.clone() for n, t in [*model.named_buffers(), *model.named_parameters()] if "scale" in n or "zero" in n}
        model.to(dtype)
        with torch.no_grad():
            assert model(ids).logits.dtype == dtype
        for name, t in [*model.named_buffers(), *model.named_parameters()]:
            if name in scales:
                assert torch.equal(t, scales[name]), name


@pytest.mark.parametrize("scheme", ["int4", "int4_asym"])
def test_int4_group_size_defaults_to_32_and_packed_weights_tell_theirs(scheme):
    """quantize_weight groups 32 inputs unless told; dequantize_weight and quantized_linear (and its reference) read a
    packed weight's group size from its shapes when not given one, and say so when the shapes give none."""
    w, x = torch.randn(16, 256), torch.randn(3, 256)
    assert all(a is b or torch.equal(a, b) for a, b in zip(quantize_weight(w, scheme), quantize_weight(w, scheme, 32)))
    for group in (32, 64, 128):
        packed, scales, zeros = quantize_weight(w, scheme, group)
        told = dequantize_weight(packed, scales, zeros, scheme=scheme, group_size=group)
        assert torch.equal(dequantize_weight(packed, scales, zeros, scheme=scheme), told)
        for op in (quantized_linear, reference.quantized_linear):
            assert torch.equal(op(x, packed, scales, zeros, scheme=scheme),
                               op(x, packed, scales, zeros, scheme=scheme, group_size=group))
    packed, scales, zeros = quantize_weight(w, scheme, 32)
    with pytest.raises(ValueError, match=r"scales \[16, 5\] do not split packed's K = 256"):
        dequantize_weight(packed, scales[:, :5], zeros if zeros is None else zeros[:, :5], scheme=scheme)


def test_compiled_kernel_checks_too():
    """The wrapper adds no checks of its own (it only reads an int4 group size from the shapes when not given one):
    the op's are ValueErrors naming the argument."""
    w, x = torch.randn(16, 128), torch.randn(2, 128)
    packed, scales, _ = quantize_weight(w, "int8")
    with pytest.raises(ValueError, match="int4 packed weights must be uint8"):
        torch.ops.lightning_spec.quantized_linear(x, packed, scales, None, "int4", 32, None)
    with pytest.raises(ValueError, match="group_size must be 32, 64 or 128 for int4, got None"):
        torch.ops.lightning_spec.quantized_linear(x, *quantize_weight(w, "int4", 32), "int4", 0, None)
    with pytest.raises(ValueError, match="unknown scheme"):
        torch.ops.lightning_spec.quantized_linear(x, packed, scales, None, "fp8", 0, None)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def on_cuda(*tensors):
    return [t.cuda() if t is not None else None for t in tensors]


@needs_cuda
@pytest.mark.parametrize("scheme,group", SCHEMES)
@pytest.mark.parametrize("M", [1, 3, 8, 16, 17, 64, 512])
@pytest.mark.parametrize("N,K", [(576, 576), (1536, 576), (576, 1536), (37, 4096), (49152, 576)])
def test_cuda_matches_reference(scheme, group, M, N, K):
    """Streaming kernels up to 16 rows (every row bound), dequantize + cuBLAS above; M = 3 reads a contiguous x that
    starts off a 16-byte boundary."""
    if M * N * K > 2e9:
        pytest.skip("the float64 reference of the largest problems takes too long")
    if group and K % group:
        pytest.skip(f"K={K} is not a multiple of group {group}")
    g = torch.Generator().manual_seed(M + N + K)
    w, bias = torch.randn(N, K, generator=g) * 0.05, torch.randn(N, generator=g)
    x = torch.randn(M * K + 1, generator=g)[1:].view(M, K) if M == 3 else torch.randn(M, K, generator=g)
    packed, scales, zeros = quantize_weight(w, scheme, group)
    for b in (None, bias):
        want = reference.quantized_linear(x, packed, scales, zeros, scheme=scheme, group_size=group, bias=b)
        xc, pc, sc, zc, bc = on_cuda(x, packed, scales, zeros, b)
        got = quantized_linear(xc, pc, sc, zc, scheme=scheme, group_size=group, bias=bc)
        assert got.is_cuda
        close(got.cpu(), want, K)


@needs_cuda
@pytest.mark.parametrize("scheme,group", SCHEMES)
def test_cuda_odd_sizes_views_and_bf16(scheme, group):
    g = torch.Generator().manual_seed(1)
    K = 96 if group in (None, 32) else 2 * group
    K = 100 if scheme in ("int8", "w8a8") else K  # int8: K % 16 != 0 takes the bytewise kernel
    for N, M in [(49152, 1), (49152, 3), (7, 5)]:
        w = torch.randn(N + 1, K, generator=g) * 0.05
        packed, scales, zeros = quantize_weight(w, scheme, group)
        packed, scales = packed[1:], scales[1:]  # int8 rows of 100 bytes: starts off a 16-byte boundary
        zeros = zeros[1:] if zeros is not None else None
        for x in (torch.randn(K, M, generator=g).t(), torch.randn(M * K + 1, generator=g)[1:].view(M, K)):
            want = reference.quantized_linear(x, packed, scales, zeros, scheme=scheme, group_size=group)
            close(quantized_linear(*on_cuda(x, packed, scales, zeros), scheme=scheme, group_size=group).cpu(), want, K)
    xb = torch.randn(2, 3, K, generator=g).bfloat16()
    got = quantized_linear(*on_cuda(xb, packed, scales, zeros), scheme=scheme, group_size=group)
    want = reference.quantized_linear(xb, packed, scales, zeros, scheme=scheme, group_size=group)
    assert got.dtype == torch.bfloat16 and got.shape == (2, 3, 7)
    torch.testing.assert_close(got.cpu().float(), want.float(), rtol=1e-2, atol=1e-2)


@needs_cuda
def test_cuda_rejects_mixed_devices():
    packed, scales, _ = quantize_weight(torch.randn(16, 128), "int8")
    with pytest.raises(ValueError, match="packed is on cpu"):
        quantized_linear(torch.randn(2, 128, device="cuda"), packed, scales, scheme="int8")
    with pytest.raises(ValueError, match="scales is on cpu"):
        quantized_linear(torch.randn(2, 128, device="cuda"), packed.cuda(), scales, scheme="int8")
