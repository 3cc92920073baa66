"""Speculative-decoding verification: verify_tree and verify_chain on the compiled op lightning_spec::verify_tree.

The wrappers check shapes, dtypes and devices (cheap, traceable), draw the uniforms when none are given and map a
chain onto the tree; the kernel checks the values. `run_tree` / `run_chain` take the kernel as an argument so that
lightning_spec.ops.reference runs the same wrappers on its pure-PyTorch twin.
"""
from typing import Callable, Optional

import torch
from torch import Tensor

from lightning_spec.ops import _extension  # noqa: F401  (registers torch.ops.lightning_spec)

TreeKernel = Callable[[Tensor, Tensor, Tensor, Optional[Tensor], Optional[Tensor], bool], tuple]

PROB_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _check(condition: bool, message: Callable[[], str]) -> None:
    """Raise ValueError(message()) unless condition: the message is formatted only on failure (an f-string of shapes
    and dtypes costs ~1 us, a dozen of them half a small tree's verification)."""
    if not condition:
        raise ValueError(message())


def _check_tensors(**arguments) -> None:
    for name, value in arguments.items():
        _check(value is None or isinstance(value, Tensor), lambda: f"{name} must be a torch.Tensor, got {type(value).__name__}")


def _check_probs(probs: Tensor, name: str, shape: tuple, device: torch.device) -> None:
    _check(probs.dtype in PROB_DTYPES, lambda: f"{name} must be float32, float64, bfloat16 or float16, got {probs.dtype}")
    _check(tuple(probs.shape) == shape, lambda: f"{name} must have shape {list(shape)}, got {list(probs.shape)}")
    _check(probs.device == device, lambda: f"{name} is on {probs.device} but target_probs is on {device}")


def _check_tokens(tokens: Tensor, name: str, shape: tuple, device: torch.device) -> None:
    _check(tokens.dtype == torch.int64, lambda: f"{name} must be int64, got {tokens.dtype}")
    _check(tuple(tokens.shape) == shape, lambda: f"{name} must have shape {list(shape)}, got {list(tokens.shape)}")
    _check(tokens.device == device, lambda: f"{name} is on {tokens.device} but target_probs is on {device}")


def _uniforms(uniforms: Optional[Tensor], shape: tuple, device: torch.device, generator) -> Tensor:
    if uniforms is None:
        return torch.rand(shape, dtype=torch.float64, device=device, generator=generator)
    _check(uniforms.is_floating_point(), lambda: f"uniforms must be floating point, got {uniforms.dtype}")
    _check(tuple(uniforms.shape) == shape, lambda: f"uniforms must have shape {list(shape)}, got {list(uniforms.shape)}")
    _check(uniforms.device == device, lambda: f"uniforms is on {uniforms.device} but target_probs is on {device}")
    return uniforms.to(torch.float64)


def run_tree(
    kernel: TreeKernel, candidates, parents, target_probs, draft_probs=None, *, greedy=False, uniforms=None, generator=None
):
    """verify_tree on the given kernel (the compiled op or its reference twin)."""
    _check_tensors(candidates=candidates, parents=parents, target_probs=target_probs, draft_probs=draft_probs, uniforms=uniforms)
    _check(target_probs.dim() == 3, lambda: f"target_probs must be [B, N, V], got {list(target_probs.shape)}")
    B, N, V = target_probs.shape
    device = target_probs.device
    _check(N >= 1 and V >= 1, lambda: f"target_probs needs N >= 1 nodes and V >= 1 tokens, got {list(target_probs.shape)}")
    _check_probs(target_probs, "target_probs", (B, N, V), device)
    _check_tokens(candidates, "candidates", (B, N), device)
    _check_tokens(parents, "parents", (B, N), device)
    if draft_probs is not None:
        rows = draft_probs.shape[1] if draft_probs.dim() == 3 and draft_probs.shape[1] == N - 1 else N
        _check_probs(draft_probs, "draft_probs", (B, rows, V), device)  # the last node is a leaf: its row is optional
        _check(draft_probs.dtype == target_probs.dtype, lambda: f"draft_probs must be {target_probs.dtype}, got {draft_probs.dtype}")
    if not greedy or uniforms is not None:
        uniforms = _uniforms(uniforms, (B, N + 1), device, generator)
    return kernel(candidates, parents, target_probs, draft_probs, uniforms, greedy)


def run_chain(
    kernel: TreeKernel, draft_tokens, target_probs, draft_probs=None, *, greedy=False, uniforms=None, generator=None
):
    """verify_chain on the given kernel: the tree with parents [-1, 0, 1, ...], node i + 1 = draft token i."""
    _check_tensors(draft_tokens=draft_tokens, target_probs=target_probs, draft_probs=draft_probs, uniforms=uniforms)
    _check(draft_tokens.dim() == 2, lambda: f"draft_tokens must be [B, S], got {list(draft_tokens.shape)}")
    B, S = draft_tokens.shape
    _check(target_probs.dim() == 3, lambda: f"target_probs must be [B, S + 1, V], got {list(target_probs.shape)}")
    V = target_probs.shape[2]
    device = target_probs.device
    _check_probs(target_probs, "target_probs", (B, S + 1, V), device)
    _check_tokens(draft_tokens, "draft_tokens", (B, S), device)
    if draft_probs is not None:  # draft token i was drawn from q = draft_probs[:, i]: the q of node i's children
        _check_probs(draft_probs, "draft_probs", (B, S, V), device)
    column = draft_tokens.new_zeros(B, 1)
    candidates = torch.cat([column, draft_tokens], 1)  # the root's token is never read
    parents = (torch.arange(S + 1, device=device) - 1).expand(B, S + 1)
    tree_uniforms = None
    if not greedy or uniforms is not None:  # uniforms[:, i] decides draft token i = node i + 1
        tree_uniforms = torch.cat([column.double(), _uniforms(uniforms, (B, S + 1), device, generator)], 1)
    _, num_accepted, next_token = run_tree(
        kernel, candidates, parents, target_probs, draft_probs, greedy=greedy, uniforms=tree_uniforms
    )
    positions = torch.arange(S + 1, device=device)
    end = num_accepted[:, None]
    tokens_or_pad = torch.cat([draft_tokens, column - 1], 1)
    output_tokens = torch.where(positions < end, tokens_or_pad, torch.where(positions == end, next_token[:, None], -1))
    return output_tokens, num_accepted


def verify_tree(candidates, parents, target_probs, draft_probs=None, *, greedy=False, uniforms=None, generator=None):
    """Verify a draft token tree against the target; returns (accepted, num_accepted, next_token).

    candidates   int64 [B, N]: token of each node; node 0 is the root (the last committed token).
    parents      int64 [B, N]: parent of each node; parents[:, 0] == -1 and 0 <= parents[b, i] < i.
    target_probs float [B, N, V]: target distribution of the token after each node (float32/64, bf16, fp16).
    draft_probs  float [B, N, V] (or [B, N - 1, V]: the last node is always a leaf) or None: the distribution
                 the children of each node were drawn from, i.i.d.; None means deterministic (greedy / top-k)
                 children, verified as one-hot drafts.
    greedy       accept, at each depth, the first child (in node-index order) whose token is the target argmax at
                 the last accepted node; next_token is that argmax after the path. Uniforms are not used.
    uniforms     float [B, N + 1] in [0, 1), else drawn with torch.rand(generator=generator) in float64.
                 uniforms[b, j] decides candidate node j (uniforms[b, 0] is unused: the root is never tested);
                 uniforms[b, N] samples next_token by inverse CDF: the first token whose running sum of the final
                 residual exceeds u times its mass.

    Stochastic (lossless): children of the current node are tried in node-index order. With draft_probs, child
    token x ~ q = draft_probs[node] is accepted iff u < p(x) / q(x), on rejection p <- norm(max(p - q, 0)) and
    the next sibling is tried (q unchanged: siblings are i.i.d. from q). Without, x is accepted iff u < p(x),
    on rejection p(x) <- 0 and p is renormalized. A token with p(x) == 0 is never accepted. When no child is
    accepted, or a leaf is reached, next_token is sampled from the current residual p.
    Numerics (shared bit for bit by kernel and reference): float64, sums sequential in token order, p kept
    unnormalized as r with mass m (u < p/q is tested as u * q(x) * m < r(x) * sum(q)).

    Returns accepted int64 [B, N] (node indices of the accepted path from 0, padded with -1), num_accepted
    int64 [B] (accepted draft nodes, root excluded) and next_token int64 [B] (correction or bonus token).
    """
    kernel = torch.ops.lightning_spec.verify_tree
    return run_tree(kernel, candidates, parents, target_probs, draft_probs, greedy=greedy, uniforms=uniforms, generator=generator)


def verify_chain(draft_tokens, target_probs, draft_probs=None, *, greedy=False, uniforms=None, generator=None):
    """Verify a chain of draft tokens; returns (output_tokens, num_accepted).

    draft_tokens int64 [B, S]; target_probs float [B, S + 1, V] (after each prefix, the last one for the bonus);
    draft_probs float [B, S, V] (the q draft token i was sampled from) or None (one-hot drafts); greedy as in
    verify_tree; uniforms float [B, S + 1]: uniforms[b, i] decides draft token i, uniforms[b, S] samples the next
    token. It is verify_tree on parents [-1, 0, 1, ...] (node i + 1 = draft token i).

    Returns output_tokens int64 [B, S + 1] (the accepted draft tokens, then the next token, padded with -1) and
    num_accepted int64 [B].
    """
    kernel = torch.ops.lightning_spec.verify_tree
    return run_chain(kernel, draft_tokens, target_probs, draft_probs, greedy=greedy, uniforms=uniforms, generator=generator)


@torch.library.register_fake("lightning_spec::verify_tree")
def _verify_tree_fake(candidates, parents, target_probs, draft_probs, uniforms, greedy):
    B, N = candidates.shape
    return candidates.new_empty(B, N), candidates.new_empty(B), candidates.new_empty(B)
