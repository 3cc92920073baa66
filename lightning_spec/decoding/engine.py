"""Speculative decoding for transformers causal LMs: draft a chain or a static tree, verify it with one target
forward through the compiled verify_tree op, keep the accepted path (see kv.py for rollback), repeat.

Greedy (temperature 0) output is the target's own greedy output; with temperature > 0 it is distributed exactly
as the target's (temperature, top-p) sampling. Chains sample their draft tokens from q and are verified with
draft_probs (accept min(1, p/q)); trees take the draft's top-k tokens as children and are verified as one-hot
drafts (recursive rejection without replacement). `target_generate` runs the same loop without a draft: it is
the baseline that speedups are measured against.
"""
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Union

import torch
from torch import Tensor
from transformers import GenerationConfig

from lightning_spec.decoding.kv import CachedLM
from lightning_spec.decoding.tree import TreeLayout, chain
from lightning_spec.models import shared_vocabulary
from lightning_spec.ops import verify_tree


@dataclass
class DecodingStats:
    """Counts of one generate call (summed over rows); `tau` etc. are derived from them."""

    max_depth: int  # draft positions per round (gamma for a chain, the depth of a tree; 0 without a draft)
    drafted: int = 0  # draft tokens proposed
    accepted: int = 0  # draft tokens accepted and emitted (not those after an EOS or past max_new_tokens)
    position_attempts: List[int] = field(default_factory=list)  # [d]: rounds whose position d + 1 was verified
    position_accepts: List[int] = field(default_factory=list)  # [d]: rounds that accepted position d + 1
    target_calls: int = 0  # target forwards after the prompt (verification rounds or decode steps)
    draft_calls: int = 0  # draft forwards after the prompt
    row_rounds: int = 0  # target calls summed over the rows still generating
    new_tokens: int = 0  # tokens emitted (EOS included)
    prefill_time: float = 0.0  # seconds spent on the prompts
    target_time: float = 0.0  # seconds in target forwards after the prompt
    draft_time: float = 0.0  # seconds in draft forwards after the prompt
    wall_time: float = 0.0  # seconds for the whole call

    def __post_init__(self):
        self.position_attempts = self.position_attempts or [0] * self.max_depth
        self.position_accepts = self.position_accepts or [0] * self.max_depth

    @classmethod
    def combine(cls, runs: Sequence["DecodingStats"]) -> "DecodingStats":
        """The counts of several runs of the same depth, summed (pooled alpha, tau and cost ratio)."""
        total = cls(max_depth=runs[0].max_depth)
        for run in runs:
            for name in ("drafted", "accepted", "target_calls", "draft_calls", "row_rounds", "new_tokens",
                         "prefill_time", "target_time", "draft_time", "wall_time"):
                setattr(total, name, getattr(total, name) + getattr(run, name))
            total.position_attempts = [a + b for a, b in zip(total.position_attempts, run.position_attempts)]
            total.position_accepts = [a + b for a, b in zip(total.position_accepts, run.position_accepts)]
        return total

    @property
    def tau(self) -> float:
        """Mean tokens emitted per target call and row (accepted draft tokens + the correction/bonus token; a round
        cut short by EOS or max_new_tokens counts what it emitted)."""
        return self.new_tokens / max(self.row_rounds, 1)

    @property
    def acceptance_per_position(self) -> List[float]:
        """P(position d accepted | position d verified), d = 1..max_depth."""
        return [a / n if n else float("nan") for a, n in zip(self.position_accepts, self.position_attempts)]

    @property
    def alpha(self) -> float:
        """Per-position acceptance pooled over positions: the alpha of the i.i.d. model behind tau's formula."""
        attempts = sum(self.position_attempts)
        return sum(self.position_accepts) / attempts if attempts else float("nan")

    @property
    def cost_ratio(self) -> float:
        """c = time of one draft forward / time of one target forward (a verification call), as measured."""
        if not (self.draft_calls and self.target_calls and self.target_time):
            return float("nan")
        return (self.draft_time / self.draft_calls) / (self.target_time / self.target_calls)

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.wall_time if self.wall_time else float("nan")


@dataclass
class GenerationOutput:
    tokens: Tensor  # int64 [B, prompt + new], rows that stopped early padded with pad_token_id, like `generate`
    stats: DecodingStats


def warp(logits: Tensor, temperature: float, top_p: float) -> Tensor:
    """Float32 probabilities after temperature and top-p (temperature 0 keeps T = 1: only the argmax is used)."""
    logits = logits.float()
    # shifted to <= 0 first, so that a tiny temperature sends the others to -inf (the argmax's one-hot), not to inf
    probs = torch.softmax((logits - logits.amax(-1, keepdim=True)) / (temperature or 1.0), dim=-1)
    if top_p < 1.0 and temperature > 0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        drop = (sorted_probs.cumsum(-1) - sorted_probs) >= top_p  # keep the smallest head with mass >= top_p
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def argmax(logits: Tensor) -> Tensor:
    """``logits.argmax(-1)`` (the first index on ties, a NaN before anything) through ``max``, whose CPU kernel is 3x
    as fast over a 49k vocabulary (21 against 68 us a row on the build machine)."""
    return logits.max(-1).indices


def verify_greedy(candidates: Tensor, parents: Tensor, logits: Tensor):
    """verify_tree(greedy=True) on the target's ``logits`` [B, N, V]: it reads only each node's argmax (the token
    target_generate takes, ties included), so the probabilities it gets are one-hot at the argmax over the few
    tokens that occur (candidates and argmaxes, renumbered), not over the vocabulary: no softmax, and rows of at most
    2N tokens instead of 49152 for SmolLM2 (at N = 5, 0.20 ms instead of 0.49 on the build machine, hot). Returns
    verify_tree's outputs."""
    tokens, index = torch.unique(torch.cat([candidates, argmax(logits)], 1), return_inverse=True)
    N = candidates.shape[1]
    one_hot = torch.zeros(*logits.shape[:2], tokens.numel(), dtype=torch.float32, device=logits.device)
    one_hot.scatter_(-1, index[:, N:, None], 1.0)
    accepted, num_accepted, next_index = verify_tree(index[:, :N], parents, one_hot, greedy=True)
    return accepted, num_accepted, tokens[next_index]


def sample(probs: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """One token per row of ``probs`` [B, V] (non-negative, positive sum), by inverse CDF on one float64 uniform
    per row (`torch.multinomial` draws V exponentials per row: a quarter of a CPU decode step at B=160).
    A token of probability 0 is never returned."""
    cdf = probs.double().cumsum(-1)
    total = cdf[:, -1:]
    u = torch.rand(total.shape, dtype=torch.float64, device=probs.device, generator=generator)
    # strictly below the total, so the first index whose cdf exceeds it holds mass
    threshold = torch.minimum(u * total, total.nextafter(torch.zeros_like(total)))
    return torch.searchsorted(cdf, threshold, right=True)[:, 0]


def _check_inputs(model, input_ids, attention_mask, max_new_tokens, temperature, top_p):
    if not isinstance(input_ids, Tensor) or input_ids.dtype != torch.int64 or input_ids.dim() != 2 or input_ids.numel() == 0:
        raise ValueError(f"input_ids must be a non-empty int64 tensor [B, T], got {getattr(input_ids, 'dtype', type(input_ids))} {list(getattr(input_ids, 'shape', []))}")
    device = next(model.parameters()).device
    if input_ids.device != device:
        raise ValueError(f"input_ids is on {input_ids.device} but the target is on {device}")
    if attention_mask is not None:
        if tuple(attention_mask.shape) != tuple(input_ids.shape) or attention_mask.device != device:
            raise ValueError(f"attention_mask must match input_ids ({list(input_ids.shape)} on {device}), got {list(attention_mask.shape)} on {attention_mask.device}")
        if not bool(attention_mask[:, -1].all()):
            raise ValueError("attention_mask: prompts must be left-padded (the last column must be real tokens)")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if not 0 <= temperature < math.inf:
        raise ValueError(f"temperature must be finite and >= 0, got {temperature!r}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")


# generation_config settings that change which token `generate` picks or when it stops, beyond what the engine takes
# as arguments (temperature, top_p, eos_token_id, pad_token_id, max_new_tokens)
_UNSUPPORTED_SETTINGS = ("repetition_penalty", "no_repeat_ngram_size", "bad_words_ids", "suppress_tokens", "begin_suppress_tokens",
                         "min_length", "min_new_tokens", "sequence_bias", "forced_bos_token_id", "forced_eos_token_id",
                         "exponential_decay_length_penalty", "encoder_repetition_penalty")


def _special_ids(model, eos_token_id, pad_token_id):
    config = model.generation_config
    default = GenerationConfig()
    ignored = [f"{n}={getattr(config, n)!r}" for n in _UNSUPPORTED_SETTINGS if getattr(config, n, None) != getattr(default, n, None)]
    if ignored:
        warnings.warn(f"the decoding engine ignores the target's generation_config {', '.join(ignored)}: its output follows "
                      "the raw logits (so it can differ from generate())", stacklevel=5)
    eos = config.eos_token_id if eos_token_id is None else eos_token_id
    eos = [] if eos is None else [int(t) for t in torch.as_tensor(eos).flatten().tolist()]  # int, list or tensor
    pad = pad_token_id if pad_token_id is not None else config.pad_token_id
    pad = int(pad) if pad is not None else (eos[0] if eos else 0)
    return eos, pad


def _prefill(lm: CachedLM, ids: Tensor, mask: Tensor) -> None:
    if ids.shape[1] == 0:
        return
    causal = torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool, device=ids.device).tril()
    see = (causal & mask[:, None, :]) | torch.eye(ids.shape[1], dtype=torch.bool, device=ids.device)
    lm.forward(ids, (mask.cumsum(1) - 1).clamp_min(0), see, logits_to_keep=1)
    lm.commit(mask)


class _Draft:
    """The draft side of a round: catch up on committed tokens, then grow the tree level by level."""

    def __init__(self, model, layout: TreeLayout, input_ids: Tensor, mask: Tensor, sample_chain: bool, vocab: int, target_vocab: int):
        self.lm = CachedLM(model, input_ids.shape[0], input_ids.device)
        self.layout = layout
        self.vocab, self.target_vocab = vocab, target_vocab  # the draft proposes the shared ids only
        # an id past the draft's embeddings (the target's padding, never a real token) reaches it as its last id:
        # that only steers proposals, never the output
        self.last_id = model.get_input_embeddings().num_embeddings - 1
        self.sample_chain = sample_chain  # chain + temperature > 0: sample children from q, verify with q
        # tree nodes fed to the draft (those with children), level by level; each level's nodes see their fed
        # ancestors, which sit in the last slots of the cache at that point
        self.fed = [i for level in layout.levels[:-1] for i in level if layout.children[i]]
        self.feeds, self.feed_sees = [], []
        for level in layout.levels[:-1]:
            feed = [i for i in level if layout.children[i]]
            before = self.fed[: self.fed.index(feed[0])]
            self.feeds.append(feed)
            self.feed_sees.append(layout.ancestors[feed][:, before].to(input_ids.device))
        self.leaf = torch.tensor([not c for c in layout.children], device=input_ids.device)
        self.leaf[0] = False  # the root was fed as a pending token
        input_ids = input_ids.clamp_max(self.last_id)
        _prefill(self.lm, input_ids[:, :-1], mask[:, :-1])
        self.pending = torch.stack([input_ids[:, -1], input_ids[:, -1]], 1)  # committed, not yet fed
        self.pending_valid = torch.tensor([[False, True]], device=input_ids.device).repeat(input_ids.shape[0], 1)

    def propose(self, temperature, top_p, generator):
        """Fill the tree: returns candidates [B, N] (root excluded: column 0 left 0) and draft_probs or None."""
        lm, layout, B = self.lm, self.layout, self.pending.shape[0]
        device = self.pending.device
        pending, valid = self.pending, self.pending_valid
        if not bool(valid[:, 0].any()):  # no row has an unfed leaf (its draft token was rejected): one token, not two
            pending, valid = pending[:, 1:], valid[:, 1:]
        width = pending.shape[1]
        positions = lm.length[:, None] + (valid.cumsum(1) - 1).clamp_min(0)
        see = torch.ones(width, width, dtype=torch.bool, device=device).tril() & valid[:, None, :] | torch.eye(width, dtype=torch.bool, device=device)
        logits = {0: lm.forward(pending, positions, see, logits_to_keep=1)[:, 0, : self.vocab]}
        lm.commit(valid)
        calls = 1
        candidates = torch.zeros(B, layout.size, dtype=torch.long, device=device)
        q_rows = [] if self.sample_chain else None
        for d, level in enumerate(layout.levels):
            for parent in {layout.parents[i].item(): None for i in level}:
                kids = layout.children[parent]
                if self.sample_chain:
                    q = warp(logits[parent], temperature, top_p)
                    q_rows.append(q)
                    candidates[:, kids[0]] = sample(q, generator)
                elif len(kids) == 1:  # argmax: a tenth of topk(1)'s time over the vocabulary
                    candidates[:, kids[0]] = argmax(logits[parent])
                else:
                    candidates[:, kids] = logits[parent].topk(len(kids), dim=-1).indices
            if d == len(self.feeds):
                break
            feed, sees = self.feeds[d], self.feed_sees[d]
            see_old = torch.zeros(1, len(feed), lm.slots, dtype=torch.bool, device=device)
            see_old[0, :, lm.slots - sees.shape[1] :] = sees
            # level d holds depth d + 1; the root, at depth 0, sits at position length - 1
            step = lm.forward(
                candidates[:, feed], lm.length[:, None] + d, torch.eye(len(feed), dtype=torch.bool, device=device), see_old
            )
            calls += 1
            logits.update({i: step[:, r, : self.vocab] for r, i in enumerate(feed)})
        draft_probs = None
        if self.sample_chain:  # over the target's ids: those past the shared ones have q = 0
            draft_probs = torch.nn.functional.pad(torch.stack(q_rows, 1), (0, self.target_vocab - self.vocab))
        return candidates, draft_probs, calls

    def accept(self, on_path: Tensor, last_node: Tensor, candidates: Tensor, next_token: Tensor) -> None:
        """Commit the fed nodes on the accepted path; the path's unfed leaf (if any) and next_token are pending."""
        if self.fed:
            self.lm.commit(on_path[:, self.fed])
        leaf_pending = self.leaf[last_node]
        self.pending = torch.stack([candidates.gather(1, last_node[:, None])[:, 0], next_token], 1).clamp_max(self.last_id)
        self.pending_valid = torch.stack([leaf_pending, torch.ones_like(leaf_pending)], 1)

    def select(self, rows: Tensor) -> None:
        self.lm.select(rows)
        self.pending, self.pending_valid = self.pending[rows], self.pending_valid[rows]


def _decode(target, draft, input_ids, max_new_tokens, layout, temperature, top_p, generator, attention_mask, eos_token_id, pad_token_id,
            logits_hook=None, vocab=None):
    _check_inputs(target, input_ids, attention_mask, max_new_tokens, temperature, top_p)
    start = time.perf_counter()
    eos, pad = _special_ids(target, eos_token_id, pad_token_id)
    B, device = input_ids.shape[0], input_ids.device
    mask = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
    greedy = temperature == 0
    target_lm = CachedLM(target, B, device)
    _prefill(target_lm, input_ids[:, :-1], mask[:, :-1])
    sample_chain = not greedy and layout is not None and all(len(c) <= 1 for c in layout.children)
    target_vocab = target.get_output_embeddings().out_features
    drafter = _Draft(draft, layout, input_ids, mask, sample_chain, vocab, target_vocab) if draft is not None else None
    stats = DecodingStats(max_depth=layout.max_depth if draft is not None else 0)
    stats.prefill_time = time.perf_counter() - start
    prefill_seconds = (target_lm.seconds, drafter.lm.seconds if drafter is not None else 0.0)

    out = torch.full((B, max_new_tokens), pad, dtype=torch.long)
    produced = [0] * B
    rows = list(range(B))  # original row of each live row
    root = input_ids[:, -1]
    eos_set = set(eos)
    if drafter is not None:
        N = layout.size
        parents = layout.parents.to(device).expand(len(rows), N)
        depth = layout.depth.to(device)
        ancestors = layout.ancestors.to(device)
    while rows:
        live = len(rows)
        if drafter is None:
            logits = target_lm.forward(root[:, None], target_lm.length[:, None], torch.ones(1, 1, 1, dtype=torch.bool, device=device))
            target_lm.commit(torch.ones(live, 1, dtype=torch.bool, device=device))
            if logits_hook is not None:
                logits_hook(rows, logits[:, 0])
            if greedy:  # the argmax of the logits: no softmax over the vocabulary per token
                next_token = argmax(logits[:, 0])
            else:
                next_token = sample(warp(logits[:, 0], temperature, top_p), generator)
            emitted = [[t] for t in next_token.tolist()]
        else:
            candidates, draft_probs, calls = drafter.propose(temperature, top_p, generator)
            candidates[:, 0] = root
            stats.draft_calls += calls
            logits = target_lm.forward(candidates, target_lm.length[:, None] + depth, ancestors)
            if greedy:
                accepted, num_accepted, next_token = verify_greedy(candidates, parents[:live], logits)
            else:
                accepted, num_accepted, next_token = verify_tree(
                    candidates, parents[:live], warp(logits, temperature, top_p), draft_probs, generator=generator
                )
            on_path = torch.zeros(live, N + 1, dtype=torch.bool, device=device)
            on_path.scatter_(1, torch.where(accepted >= 0, accepted, N), True)
            on_path = on_path[:, :N]
            target_lm.commit(on_path)
            last_node = accepted.gather(1, num_accepted[:, None])[:, 0]
            drafter.accept(on_path, last_node, candidates, next_token)
            path_tokens = candidates.gather(1, accepted.clamp_min(0)).tolist()
            counts = num_accepted.tolist()
            emitted = [path_tokens[r][1 : 1 + n] + [t] for r, (n, t) in enumerate(zip(counts, next_token.tolist()))]
            stats.drafted += live * (N - 1)
            for n, last in zip(counts, last_node.tolist()):
                verified = n + 1 if layout.children[last] else n  # a path that ends at a leaf verified no deeper
                for d in range(verified):
                    stats.position_attempts[d] += 1
                    stats.position_accepts[d] += d < n
        stats.target_calls += 1
        stats.row_rounds += live
        keep = []
        for r, tokens in enumerate(emitted):
            row, done, written = rows[r], False, 0
            for t in tokens:
                out[row, produced[row]] = t
                produced[row] += 1
                written += 1
                if t in eos_set or produced[row] == max_new_tokens:
                    done = True
                    break
            if drafter is not None:  # draft tokens after an EOS or past max_new_tokens were accepted but not emitted
                stats.accepted += min(written, counts[r])
            if not done:
                keep.append(r)
        root = next_token
        if len(keep) < live:
            index = torch.tensor(keep, dtype=torch.long, device=device)
            rows = [rows[r] for r in keep]
            root = root[index]
            target_lm.select(index)
            if drafter is not None:
                drafter.select(index)
            if not rows:
                break
        target_lm.compact()
        if drafter is not None:
            drafter.lm.compact()
    stats.new_tokens = sum(produced)
    stats.target_time = target_lm.seconds - prefill_seconds[0]
    stats.draft_time = drafter.lm.seconds - prefill_seconds[1] if drafter is not None else 0.0
    stats.wall_time = time.perf_counter() - start
    tokens = torch.cat([input_ids, out[:, : max(produced)].to(device)], dim=1)
    return GenerationOutput(tokens=tokens, stats=stats)


@torch.no_grad()
def speculative_generate(
    target,
    draft,
    input_ids: Tensor,
    max_new_tokens: int,
    *,
    gamma: int = 4,
    tree: Optional[Sequence[int]] = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: Optional[torch.Generator] = None,
    attention_mask: Optional[Tensor] = None,
    eos_token_id: Optional[Union[int, Sequence[int]]] = None,
    pad_token_id: Optional[int] = None,
) -> GenerationOutput:
    """Generate with ``draft`` proposing and ``target`` verifying; the output follows the target exactly.

    input_ids int64 [B, T] (left-padded with ``attention_mask`` when prompts differ in length); a chain of
    ``gamma`` draft tokens per round, or a static ``tree`` (parents list, see lightning_spec.decoding.tree; its
    depth replaces gamma). ``temperature`` 0 is greedy; otherwise sampling at that temperature and ``top_p``,
    with ``generator`` for every random draw. Rows stop at ``eos_token_id`` (default: the target's generation
    config) or after ``max_new_tokens``. Returns ``.tokens`` [B, T + new] and ``.stats`` (DecodingStats).
    Draft and target may score different numbers of ids where one pads its embeddings (Qwen2.5 0.5B with 72B:
    151936 and 152064, see ``shared_vocabulary``): the draft then proposes only the ids both have.

    Example::

        out = speculative_generate(target, draft, ids, 64, gamma=4)
        print(tokenizer.decode(out.tokens[0]), out.stats.tau)
    """
    vocab = shared_vocabulary(draft, target)
    layout = TreeLayout.from_parents(tree if tree is not None else chain(gamma))
    widest = max(len(c) for c in layout.children)
    if widest > vocab:
        raise ValueError(f"tree: a node has {widest} children but the draft's vocabulary has only {vocab} tokens")
    return _decode(target, draft, input_ids, max_new_tokens, layout, temperature, top_p, generator, attention_mask, eos_token_id, pad_token_id,
                   vocab=vocab)


@torch.no_grad()
def target_generate(
    target,
    input_ids: Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: Optional[torch.Generator] = None,
    attention_mask: Optional[Tensor] = None,
    eos_token_id: Optional[Union[int, Sequence[int]]] = None,
    pad_token_id: Optional[int] = None,
    logits_hook: Optional[Callable[[List[int], Tensor], None]] = None,
) -> GenerationOutput:
    """Plain autoregressive decoding of ``target`` in the same engine (the speedup baseline); same arguments
    and outputs as `speculative_generate`. Finished rows leave the batch, so they cost nothing.

    ``logits_hook(rows, logits)`` sees every step before its sampling: the input rows still generating and the
    target's float32 logits [len(rows), V] for the token each is about to emit (one call per emitted token).
    """
    return _decode(target, None, input_ids, max_new_tokens, None, temperature, top_p, generator, attention_mask, eos_token_id, pad_token_id,
                   logits_hook)
