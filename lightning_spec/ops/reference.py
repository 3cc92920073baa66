"""Pure-PyTorch twins of the compiled ops, for tests and reading: same wrappers, same decisions bit for bit.

The kernel below walks each row in Python floats (float64) with the exact arithmetic of csrc/verify_walk.h:
sequential sums in token order, the same expressions in the same order (Python never fuses a multiply-add).
"""
import torch

from lightning_spec.ops.verify import run_chain, run_tree


def _fail(message: str):
    raise ValueError(f"verify_tree: {message}")


def _sequential_sum(values) -> float:
    total = 0.0
    for v in values:  # not sum(): Python >= 3.12 compensates float sums
        total += v
    return total


def _positive_part(v: float) -> float:
    return v if v > 0.0 else 0.0


def _sample_inverse_cdf(r: list, m: float, u: float) -> int:
    threshold, running, last = u * m, 0.0, 0
    for i, v in enumerate(r):
        if v > 0.0:
            running += v
            last = i
            if running > threshold:
                return i
    return last


def _walk_row(candidates, parents, target, draft, uniforms, greedy):
    N = len(candidates)
    accepted, node = [0], 0
    while True:
        children = [j for j in range(node + 1, N) if parents[j] == node]
        chosen = None
        if greedy:
            row = target[node].tolist()
            best = max(range(len(row)), key=row.__getitem__)  # the first maximum, as torch.argmax
            chosen = next((j for j in children if candidates[j] == best), None)
            if chosen is None:
                return accepted, best
        else:
            r = target[node].tolist()
            m = _sequential_sum(r)
            q = draft[node].tolist() if draft is not None and children else None
            qm = _sequential_sum(q) if q is not None else 0.0
            for j in children:
                x, u = candidates[j], uniforms[j]
                if (u * q[x] * m < r[x] * qm) if q is not None else (u * m < r[x]):
                    chosen = j
                    break
                if q is not None:
                    residual = [_positive_part(ri * qm - qi * m) for ri, qi in zip(r, q)]
                else:
                    residual = [0.0 if i == x else ri for i, ri in enumerate(r)]
                residual_mass = _sequential_sum(residual)
                if residual_mass > 0.0:  # else (rounding, or x outside q's support) p stays as it was
                    r, m = residual, residual_mass
            if chosen is None:
                return accepted, _sample_inverse_cdf(r, m, uniforms[N])
        accepted.append(chosen)
        node = chosen


def probability_sum_tolerance(dtype: torch.dtype, V: int) -> float:
    """How far a row of ``dtype`` probabilities over V tokens may sum from 1 (csrc/verify_checks.h): 1e-3, plus the
    dtype's rounding of each probability (2 eps over the row) and half its smallest subnormal per token."""
    info = torch.finfo(dtype)
    return 1e-3 + 2 * info.eps + V * info.eps * info.smallest_normal / 2


def _check_probabilities(probs: torch.Tensor, name: str) -> None:
    values = probs.double()
    if not bool((torch.isfinite(values) & (values >= 0)).all()):
        _fail(f"{name} has non-finite or negative values")
    tolerance = probability_sum_tolerance(probs.dtype, probs.shape[-1])
    if not bool(((values.sum(-1) - 1.0).abs() <= tolerance).all()):
        _fail(f"{name} rows must sum to 1 (within {tolerance:g})")


def verify_tree_kernel(candidates, parents, target_probs, draft_probs, uniforms, greedy):
    """Reference of torch.ops.lightning_spec.verify_tree (values checked here, metadata by the wrappers)."""
    B, N, V = target_probs.shape
    if not bool((parents[:, 0] == -1).all()):
        _fail("parents[:, 0] must be -1 (the root)")
    if not bool(((parents[:, 1:] >= 0) & (parents[:, 1:] < torch.arange(1, N, device=parents.device))).all()):
        _fail("parents must satisfy 0 <= parents[b, i] < i for i >= 1")
    if not bool(((candidates >= 0) & (candidates < V)).all()):
        _fail(f"candidates (verify_chain's draft_tokens) must lie in [0, {V})")
    _check_probabilities(target_probs, "target_probs")
    if draft_probs is not None:
        _check_probabilities(draft_probs, "draft_probs")
    if uniforms is not None and not bool(((uniforms >= 0) & (uniforms < 1)).all()):
        _fail("uniforms must lie in [0, 1)")

    accepted = torch.full((B, N), -1, dtype=torch.int64)
    num_accepted = torch.empty(B, dtype=torch.int64)
    next_token = torch.empty(B, dtype=torch.int64)
    # rows of probabilities become Python floats only when the walk visits them
    draft_rows = draft_probs.cpu().double() if draft_probs is not None else [None] * B
    uniform_rows = uniforms.tolist() if uniforms is not None else [None] * B
    rows = zip(candidates.tolist(), parents.tolist(), target_probs.cpu().double(), draft_rows, uniform_rows)
    for b, (cand, par, target, draft, unif) in enumerate(rows):
        path, next_token[b] = _walk_row(cand, par, target, draft, unif, greedy)
        accepted[b, : len(path)] = torch.tensor(path)
        num_accepted[b] = len(path) - 1
    device = candidates.device
    return accepted.to(device), num_accepted.to(device), next_token.to(device)


def verify_tree(candidates, parents, target_probs, draft_probs=None, *, greedy=False, uniforms=None, generator=None):
    """Reference of lightning_spec.ops.verify_tree (same arguments, same results)."""
    return run_tree(
        verify_tree_kernel, candidates, parents, target_probs, draft_probs, greedy=greedy, uniforms=uniforms, generator=generator
    )


def verify_chain(draft_tokens, target_probs, draft_probs=None, *, greedy=False, uniforms=None, generator=None):
    """Reference of lightning_spec.ops.verify_chain (same arguments, same results)."""
    return run_chain(
        verify_tree_kernel, draft_tokens, target_probs, draft_probs, greedy=greedy, uniforms=uniforms, generator=generator
    )


def quantized_linear(x, packed, scales, zeros=None, *, scheme, group_size=None, bias=None):
    """Reference of lightning_spec.ops.quantized_linear: dequantize_weight, then F.linear in float64."""
    from lightning_spec.ops.qmatmul import check_quantized_linear_args
    from lightning_spec.quant.numerics import dequantize_weight, packed_group_size, quantize_activation

    group_size = packed_group_size(packed, scales, scheme, group_size)
    check_quantized_linear_args(x, packed, scales, zeros, scheme, group_size, bias)
    weight = dequantize_weight(packed, scales, zeros, scheme=scheme, group_size=group_size).double()
    x2 = x.reshape(-1, x.shape[-1]).double()
    if scheme == "w8a8":
        codes, scale = quantize_activation(x2.float())
        x2 = codes.double() * scale.double()[:, None]
    y = torch.nn.functional.linear(x2, weight, bias.double() if bias is not None else None)
    return y.to(x.dtype).reshape(*x.shape[:-1], packed.shape[0])


def small_batch_linear(x, weight, bias=None):
    """Reference of lightning_spec.ops.small_batch_linear: F.linear in float64."""
    y = torch.nn.functional.linear(x.double(), weight.double(), bias.double() if bias is not None else None)
    return y.to(x.dtype)


def fake_quantize(input, scale, zero=None, *, scheme, group_size=None, observe=False):
    """Reference of lightning_spec.ops.fake_quantize: the numerics' PyTorch expressions, one pass each."""
    from lightning_spec.ops.fake_quant import check_fake_quantize_args
    from lightning_spec.quant.numerics import _codes, qrange, weight_qparams

    check_fake_quantize_args(input, scale, zero, scheme, group_size)
    if observe:
        observed_scale, observed_zero = weight_qparams(input, scheme, group_size)
        scale.copy_(observed_scale)
        if zero is not None:
            zero.copy_(observed_zero)
    rows, groups = scale.shape
    s = scale[:, :, None]
    z = zero[:, :, None] if zero is not None else None
    code, inside = _codes(input.reshape(rows, groups, -1) / s, z, *qrange(scheme))
    out = (code - z) * s if z is not None else code * s
    return out.reshape(input.shape), inside.reshape(input.shape)
