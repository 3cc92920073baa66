"""lightning_spec.ops.verify_tree / verify_chain: hand-built cases, compiled == reference bit for bit, losslessness
(chi-square of the first one and two emitted tokens against the target), bad inputs, fuzzing, the CUDA compile."""
import importlib
import os
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_spec import ops
from lightning_spec.ops import reference

from chisquare import chi_square_pvalue

IMPLS = {"compiled": (ops.verify_tree, ops.verify_chain), "reference": (reference.verify_tree, reference.verify_chain)}


@pytest.fixture(params=sorted(IMPLS))
def impl(request):
    return IMPLS[request.param]


def peaked(argmaxes, V):
    """Target rows putting 0.5 on each given token and the rest uniformly elsewhere."""
    rows = torch.full((len(argmaxes), V), 0.5 / (V - 1), dtype=torch.float64)
    rows[torch.arange(len(argmaxes)), torch.tensor(argmaxes)] = 0.5
    return rows


def full_tree(depth, branching):
    """Parents of the full tree with this depth and branching, nodes in breadth-first order."""
    parents, level = [-1], [0]
    for _ in range(depth):
        next_level = []
        for node in level:
            for _ in range(branching):
                parents.append(node)
                next_level.append(len(parents) - 1)
        level = next_level
    return parents


def children_of(parents):
    children = [[] for _ in parents]
    for node, parent in enumerate(parents[1:], 1):
        children[parent].append(node)
    return children


def as_batch(*rows):
    return [torch.as_tensor(row).unsqueeze(0) for row in rows]


# ---------------------------------------------------------------- the implementation in use


def test_compiled_ops_are_in_use_under_ci():
    if os.environ.get("CI") != "true":
        pytest.skip("CI is not set")
    assert ops.active_implementation() == "compiled"
    assert ops.extension_path().is_file()


def test_missing_extension_says_how_to_build(monkeypatch):
    import lightning_spec
    from lightning_spec.ops import _extension

    monkeypatch.setitem(sys.modules, "lightning_spec._C", None)
    monkeypatch.delattr(lightning_spec, "_C")
    with pytest.raises(ImportError, match="pip install --no-build-isolation -e"):
        importlib.reload(_extension)


def test_extension_registers_the_op():
    assert ops.active_implementation() == "compiled"
    assert ops.extension_path().name.startswith("_C")


# ---------------------------------------------------------------- hand-built trees


def test_greedy_walks_the_argmax_path(impl):
    verify_tree, _ = impl
    parents = [-1, 0, 0, 0, 2, 2, 5]
    tokens = [0, 5, 2, 7, 1, 3, 0]
    argmaxes = [2, 9, 3, 9, 9, 0, 4]  # root -> node 2 -> node 5 -> node 6 (a leaf), then 4
    candidates, parents_t, target = as_batch(tokens, parents, peaked(argmaxes, 10))
    accepted, num_accepted, next_token = verify_tree(candidates, parents_t, target, greedy=True)
    assert accepted.tolist() == [[0, 2, 5, 6, -1, -1, -1]]
    assert num_accepted.tolist() == [3] and next_token.tolist() == [4]


def test_greedy_takes_the_first_of_equal_siblings(impl):
    verify_tree, _ = impl
    candidates, parents, target = as_batch([0, 3, 3], [-1, 0, 0], peaked([3, 1, 2], 4))
    accepted, num_accepted, next_token = verify_tree(candidates, parents, target, greedy=True)
    assert accepted.tolist() == [[0, 1, -1]] and num_accepted.tolist() == [1] and next_token.tolist() == [1]


@pytest.mark.parametrize("depth,branching", [(1, 1), (1, 4), (2, 3), (3, 2), (4, 4), (5, 1), (5, 2)])
@pytest.mark.parametrize("stop_early", [False, True])
def test_greedy_on_full_trees(impl, depth, branching, stop_early):
    verify_tree, _ = impl
    g = torch.Generator().manual_seed(depth * 10 + branching)
    V = 16
    parents = full_tree(depth, branching)
    children = children_of(parents)
    tokens = [0] * len(parents)
    argmaxes = torch.randint(V, (len(parents),), generator=g).tolist()
    for node, kids in enumerate(children):
        for kid, token in zip(kids, torch.randperm(V, generator=g).tolist()):
            tokens[kid] = token
    path, node = [0], 0
    for _ in range(depth - 1 if stop_early else depth):
        node = children[node][int(torch.randint(branching, (1,), generator=g))]
        argmaxes[parents[node]] = tokens[node]
        path.append(node)
    taken = {tokens[kid] for kid in children[node]}
    argmaxes[node] = next(t for t in range(V) if t not in taken)
    candidates, parents_t, target = as_batch(tokens, parents, peaked(argmaxes, V))
    accepted, num_accepted, next_token = verify_tree(candidates, parents_t, target, greedy=True)
    assert accepted[0, : len(path)].tolist() == path and (accepted[0, len(path) :] == -1).all()
    assert num_accepted.tolist() == [len(path) - 1] and next_token.tolist() == [argmaxes[node]]


@pytest.mark.parametrize("depth,branching", [(1, 4), (2, 2), (3, 3), (5, 1), (5, 2)])
def test_zero_uniforms_accept_the_first_possible_child(impl, depth, branching):
    """u = 0 accepts any candidate with p > 0 and none with p == 0; the final u = 0 takes the first possible token."""
    verify_tree, _ = impl
    g = torch.Generator().manual_seed(depth * 10 + branching)
    V = 8
    parents = full_tree(depth, branching)
    children = children_of(parents)
    tokens = [0] + torch.randint(V, (len(parents) - 1,), generator=g).tolist()
    target = torch.rand(len(parents), V, generator=g, dtype=torch.float64)
    target[torch.rand(len(parents), V, generator=g) < 0.4] = 0.0
    target[:, V - 1] += 0.1  # no empty row
    target /= target.sum(-1, keepdim=True)
    path, node = [0], 0
    while True:
        node = next((kid for kid in children[node] if target[node, tokens[kid]] > 0), None)
        if node is None:
            break
        path.append(node)
    last = path[-1]
    expected_next = int((target[last] > 0).nonzero()[0])
    candidates, parents_t, target_t = as_batch(tokens, parents, target)
    uniforms = torch.zeros(1, len(parents) + 1, dtype=torch.float64)
    accepted, num_accepted, next_token = verify_tree(candidates, parents_t, target_t, uniforms=uniforms)
    assert accepted[0, : len(path)].tolist() == path
    assert num_accepted.tolist() == [len(path) - 1] and next_token.tolist() == [expected_next]


@pytest.mark.parametrize("u_last_child,expected", [(0.7, ([0, 3, -1, -1], 1, 2)), (0.72, ([0, -1, -1, -1], 0, 2))])
def test_one_hot_drafts_by_hand(impl, u_last_child, expected):
    """Root p = [.5, .3, .2, 0]; children 1, 3, 0. Token 1: 0.5 >= 0.3 rejects, p -> [.5, 0, .2, 0] / .7; token 3
    (p = 0) is rejected even at u = 0; token 0 is accepted iff u * 0.7 < 0.5. The leaf then samples 0.35 -> 2."""
    verify_tree, _ = impl
    target = torch.tensor([[0.5, 0.3, 0.2, 0.0], [0.25] * 4, [0.25] * 4, [0.1, 0.2, 0.3, 0.4]], dtype=torch.float64)
    candidates, parents, target = as_batch([0, 1, 3, 0], [-1, 0, 0, 0], target)
    uniforms = torch.tensor([[0.0, 0.5, 0.0, u_last_child, 0.35]], dtype=torch.float64)
    accepted, num_accepted, next_token = verify_tree(candidates, parents, target, uniforms=uniforms)
    assert (accepted[0].tolist(), int(num_accepted), int(next_token)) == expected


@pytest.mark.parametrize("u_first,expected", [(0.5, ([0, -1, -1], 0, 0)), (0.49, ([0, 1, -1], 1, 1))])
def test_draft_probs_by_hand(impl, u_first, expected):
    """p = [.6, .4], q = [.2, .8]: token 1 is accepted iff u < 0.5 (strict: 0.5 rejects); after the rejection
    p -> [1, 0], so the second sibling (token 1 again) is rejected even at u = 0 and the correction is 0."""
    verify_tree, _ = impl
    target = torch.tensor([[0.6, 0.4], [0.5, 0.5], [0.5, 0.5]], dtype=torch.float64)
    draft = torch.tensor([[0.2, 0.8], [0.5, 0.5], [0.5, 0.5]], dtype=torch.float64)
    candidates, parents, target, draft = as_batch([0, 1, 1], [-1, 0, 0], target, draft)
    uniforms = torch.tensor([[0.0, u_first, 0.0, 0.9]], dtype=torch.float64)
    accepted, num_accepted, next_token = verify_tree(candidates, parents, target, draft, uniforms=uniforms)
    assert (accepted[0].tolist(), int(num_accepted), int(next_token)) == expected


def test_chain_greedy(impl):
    _, verify_chain = impl
    draft_tokens = torch.tensor([[3, 1, 2], [3, 1, 2]])
    target = torch.stack([peaked([3, 1, 0, 5], 6), peaked([3, 1, 2, 5], 6)])
    output_tokens, num_accepted = verify_chain(draft_tokens, target, greedy=True)
    assert output_tokens.tolist() == [[3, 1, 0, -1], [3, 1, 2, 5]] and num_accepted.tolist() == [2, 3]


def test_chain_with_draft_probs(impl):
    """u = 0: token 1 (p > 0) is accepted, token 2 with p = 0 is rejected; p -> max(p - q, 0) gives 0 first."""
    _, verify_chain = impl
    target = torch.tensor([[[0.2, 0.5, 0.3], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]]], dtype=torch.float64)
    draft = torch.full((1, 2, 3), 1 / 3, dtype=torch.float64)
    output_tokens, num_accepted = verify_chain(torch.tensor([[1, 2]]), target, draft, uniforms=torch.zeros(1, 3))
    assert output_tokens.tolist() == [[1, 0, -1]] and num_accepted.tolist() == [1]
    target[0, 1] = torch.tensor([0.0, 0.5, 0.5])
    output_tokens, num_accepted = verify_chain(torch.tensor([[1, 2]]), target, draft, uniforms=torch.zeros(1, 3))
    assert output_tokens.tolist() == [[1, 2, 2]] and num_accepted.tolist() == [2]


# ---------------------------------------------------------------- compiled == reference


def random_inputs(seed, B=24, V=9, dtype=torch.float64, N=None):
    """Random trees whose candidates are drawn from their parent's target (so paths get deep), sparse targets."""
    g = torch.Generator().manual_seed(seed)
    N = N or int(torch.randint(1, 12, (1,), generator=g))
    parents = torch.full((B, N), -1, dtype=torch.int64)
    for i in range(1, N):
        parents[:, i] = torch.randint(i, (B,), generator=g)

    def probs(rows):  # multiples of 1/64: exact in every dtype, sums exactly 1
        counts = torch.rand(rows, V, generator=g) * (torch.rand(rows, V, generator=g) > 0.3)
        counts[:, 0] += 0.01
        counts = torch.floor(counts / counts.sum(-1, keepdim=True) * 64)
        counts[:, 0] += 64 - counts.sum(-1)
        return (counts / 64).to(dtype)

    target = probs(B * N).view(B, N, V)
    draft = probs(B * N).view(B, N, V)
    parent_rows = target.double().gather(1, parents.clamp(min=0)[..., None].expand(B, N, V)).view(B * N, V)
    candidates = torch.multinomial(parent_rows + 0.05, 1, generator=g).view(B, N)
    uniforms = torch.rand(B, N + 1, generator=g, dtype=torch.float64)
    return candidates, parents, target, draft, uniforms


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["greedy", "draft_probs", "one_hot"])
@pytest.mark.parametrize("seed", range(4))
def test_compiled_equals_reference_on_trees(dtype, mode, seed):
    candidates, parents, target, draft, uniforms = random_inputs(seed, dtype=dtype)
    draft = draft if mode == "draft_probs" else None
    kwargs = dict(greedy=mode == "greedy", uniforms=uniforms)
    compiled = ops.verify_tree(candidates, parents, target, draft, **kwargs)
    expected = reference.verify_tree(candidates, parents, target, draft, **kwargs)
    for got, want in zip(compiled, expected):
        assert torch.equal(got, want)
    if mode == "draft_probs":  # the last node is a leaf: its draft row may be left out
        shorter = ops.verify_tree(candidates, parents, target, draft[:, :-1], **kwargs)
        assert all(torch.equal(a, b) for a, b in zip(shorter, compiled))


@pytest.mark.parametrize("mode", ["greedy", "draft_probs", "one_hot"])
@pytest.mark.parametrize("seed", range(3))
def test_compiled_equals_reference_on_chains(mode, seed):
    g = torch.Generator().manual_seed(seed)
    B, S, V = 32, 5, 7
    target = torch.rand(B, S + 1, V, generator=g, dtype=torch.float64).softmax(-1)
    draft = torch.rand(B, S, V, generator=g, dtype=torch.float64).softmax(-1)
    draft_tokens = torch.multinomial(target[:, :S].reshape(-1, V), 1, generator=g).view(B, S)
    draft = draft if mode == "draft_probs" else None
    kwargs = dict(greedy=mode == "greedy", generator=torch.Generator().manual_seed(seed))
    compiled = ops.verify_chain(draft_tokens, target, draft, **kwargs)
    kwargs["generator"] = torch.Generator().manual_seed(seed)
    expected = reference.verify_chain(draft_tokens, target, draft, **kwargs)
    for got, want in zip(compiled, expected):
        assert torch.equal(got, want)


def test_torch_compile_fullgraph_traces_the_ops():
    def both(candidates, parents, target, draft, uniforms):
        tree = ops.verify_tree(candidates, parents, target, draft, uniforms=uniforms)
        chain = ops.verify_chain(candidates[:, 1:], target, draft[:, :-1], uniforms=uniforms[:, 1:])
        greedy = ops.verify_tree(candidates, parents, target, greedy=True)
        return tree + chain + greedy

    candidates, parents, target, draft, uniforms = random_inputs(0, N=6)
    compiled = torch.compile(both, fullgraph=True, backend="eager")(candidates, parents, target, draft, uniforms)
    for got, want in zip(compiled, both(candidates, parents, target, draft, uniforms)):
        assert torch.equal(got, want)


# ---------------------------------------------------------------- losslessness
# Compiled op only: the reference makes the same decisions bit for bit (above) but would take minutes here.

V_STAT = 6
DEPTHS = 6  # target/draft tables by context depth (root contexts have depth 0 or 1, trees add up to 3)
TREE = [-1, 0, 0, 0, 1, 1, 2, 4, 4]  # branching 3, 2, 1, 2; depth 3
CHAIN = [-1, 0, 1, 2]


def target_table(g):
    """p(next | context) = table[len(context), last token]: fixed per context, some tokens impossible."""
    logits = torch.randn(DEPTHS, V_STAT, V_STAT, generator=g, dtype=torch.float64) * 1.2
    best = logits.argmax(-1, keepdim=True)
    impossible = torch.rand(DEPTHS, V_STAT, V_STAT, generator=g) < 0.15
    forced = (best + 1 + torch.randint(V_STAT - 1, best.shape, generator=g)) % V_STAT  # every row has a zero
    impossible.scatter_(-1, forced, True)
    impossible.scatter_(-1, best, False)
    probs = logits.softmax(-1).masked_fill(impossible, 0.0)
    return probs / probs.sum(-1, keepdim=True)


def draft_table(kind, target, g):
    if kind == "random":
        return torch.randn(target.shape, generator=g, dtype=torch.float64).mul(1.5).softmax(-1)
    if kind == "near_uniform":
        q = 1.0 + 0.05 * torch.rand(target.shape, generator=g, dtype=torch.float64)
        return q / q.sum(-1, keepdim=True)
    if kind == "one_hot":
        return torch.nn.functional.one_hot(torch.randint(V_STAT, target.shape[:-1], generator=g), V_STAT).double()
    if kind == "disjoint":  # all draft mass where the target has none: nothing is ever accepted
        q = (target == 0).double()
        return q / q.sum(-1, keepdim=True)
    raise KeyError(kind)


def draft_tree(parents, root_depth, root_token, target_tab, draft_tab, with_draft_probs, g):
    """A batch of draft trees grown from root contexts (depth, last token), each node's tables by its context."""
    B, N = root_token.shape[0], len(parents)
    depth = torch.zeros(B, N, dtype=torch.int64)
    last = torch.zeros(B, N, dtype=torch.int64)
    depth[:, 0], last[:, 0] = root_depth, root_token
    children = children_of(parents)
    for node in range(N):
        kids = children[node]
        if not kids:
            continue
        q = draft_tab[depth[:, node], last[:, node]]
        if with_draft_probs:  # i.i.d. siblings from q
            tokens = torch.multinomial(q, len(kids), replacement=True, generator=g)
        else:  # deterministic-style siblings: distinct tokens, chosen independently of the target's randomness
            tokens = torch.multinomial(q + 0.05, len(kids), replacement=False, generator=g)
        for i, kid in enumerate(kids):
            depth[:, kid], last[:, kid] = depth[:, node] + 1, tokens[:, i]
    candidates = last.clone()
    candidates[:, 0] = 0
    target = target_tab[depth, last]
    draft = draft_tab[depth, last] if with_draft_probs else None
    return candidates, target, draft


def first_tokens(shape, with_draft_probs, root_depth, root_token, tables, g):
    """Run one verification per row from the given root contexts; return the emitted tokens [B, 2] (-1 if one)."""
    parents = TREE if shape == "tree" else CHAIN
    candidates, target, draft = draft_tree(parents, root_depth, root_token, *tables, with_draft_probs, g)
    B, N = candidates.shape
    if shape == "chain":
        output, _ = ops.verify_chain(candidates[:, 1:], target, draft[:, :-1] if draft is not None else None, generator=g)
        return output[:, :2]
    parents_t = torch.tensor(parents).expand(B, N)
    accepted, num_accepted, next_token = ops.verify_tree(candidates, parents_t, target, draft, generator=g)
    path_tokens = torch.where(accepted >= 0, candidates.gather(1, accepted.clamp(min=0)), -1)
    emitted = torch.cat([path_tokens[:, 1:], torch.full((B, 1), -1)], 1)
    emitted[torch.arange(B), num_accepted] = next_token
    return emitted[:, :2]


STAT_CASES = [
    ("chain", True, "random"), ("chain", False, "random"), ("chain", True, "disjoint"),
    ("tree", True, "random"), ("tree", False, "random"),
    ("tree", True, "disjoint"), ("tree", True, "one_hot"), ("tree", True, "near_uniform"), ("tree", False, "one_hot"),
]


@pytest.mark.parametrize("shape,with_draft_probs,kind", STAT_CASES)
def test_emitted_tokens_follow_the_target(shape, with_draft_probs, kind):
    """1e5 trials: the first emitted token ~ p(. | root) and the first two ~ p(t1 | root) p(t2 | t1)."""
    g = torch.Generator().manual_seed(STAT_CASES.index((shape, with_draft_probs, kind)))
    target_tab = target_table(g)
    tables = (target_tab, draft_table(kind, target_tab, g))
    B, calls = 20000, 5
    pairs = []
    for _ in range(calls):
        emitted = first_tokens(shape, with_draft_probs, 0, torch.zeros(B, dtype=torch.int64), tables, g)
        short = emitted[:, 1] < 0  # one token emitted: the second comes from the next verification
        if short.any():
            again = first_tokens(shape, with_draft_probs, 1, emitted[short, 0], tables, g)
            emitted[short, 1] = again[:, 0]
        pairs.append(emitted)
    pairs = torch.cat(pairs)
    first = target_tab[0, 0]
    joint = first[:, None] * target_tab[1]
    assert chi_square_pvalue(torch.bincount(pairs[:, 0], minlength=V_STAT).double(), first) > 1e-3
    pair_counts = torch.bincount(pairs[:, 0] * V_STAT + pairs[:, 1], minlength=V_STAT**2).double()
    assert chi_square_pvalue(pair_counts, joint.flatten()) > 1e-3


# ---------------------------------------------------------------- bad inputs


def valid_args():
    candidates, parents, target, draft, uniforms = random_inputs(7, B=3, V=5, N=6)
    return dict(candidates=candidates, parents=parents, target_probs=target, draft_probs=draft, uniforms=uniforms)


def set_item(name, index, value):
    def mutate(args):
        args[name] = args[name].clone()
        args[name][index] = value

    return mutate


def replace(name, make):
    def mutate(args):
        args[name] = make(args[name])

    return mutate


BAD_INPUTS = {
    "candidates float": ("candidates", replace("candidates", lambda t: t.double())),
    "candidates shape": ("candidates", replace("candidates", lambda t: t[:, :-1])),
    "candidates out of range": ("candidates", set_item("candidates", (0, 0), 5)),
    "candidates negative": ("candidates", set_item("candidates", (1, 0), -1)),
    "parents int32": ("parents", replace("parents", lambda t: t.int())),
    "parents root": ("parents", set_item("parents", (0, 0), 0)),
    "parents not topological": ("parents", replace("parents", lambda t: torch.cat([t[:, :1], t[:, 1:] + 1], 1))),
    "parents negative": ("parents", replace("parents", lambda t: torch.cat([t[:, :1], t[:, 1:] * 0 - 2], 1))),
    "target int": ("target_probs", replace("target_probs", lambda t: t.long())),
    "target 2-D": ("target_probs", replace("target_probs", lambda t: t[0])),
    "target nan": ("target_probs", set_item("target_probs", (0, 0, 1), float("nan"))),
    "target inf": ("target_probs", set_item("target_probs", (2, 0, 1), float("inf"))),
    "target negative": ("target_probs", replace("target_probs", lambda t: t - t * 2 * (t > 0.1))),
    "target not summing": ("target_probs", replace("target_probs", lambda t: t * 1.01)),
    "draft nan": ("draft_probs", set_item("draft_probs", (1, 0, 0), float("nan"))),
    "draft not summing": ("draft_probs", replace("draft_probs", lambda t: t * 0.99)),
    "draft V mismatch": ("draft_probs", replace("draft_probs", lambda t: t[..., :-1])),
    "draft dtype mismatch": ("draft_probs", replace("draft_probs", lambda t: t.float())),
    "uniforms shape": ("uniforms", replace("uniforms", lambda t: t[:, :-1])),
    "uniforms one": ("uniforms", set_item("uniforms", (0, 0), 1.0)),
    "uniforms nan": ("uniforms", set_item("uniforms", (0, 1), float("nan"))),
}
NOT_TENSORS = {  # the wrappers' (the raw op's dispatcher refuses them too, with a RuntimeError naming the argument)
    "candidates list": ("candidates", replace("candidates", lambda t: t.tolist())),
    "target numpy": ("target_probs", replace("target_probs", lambda t: t.numpy())),
}
DEVICE_MISMATCH = {
    name: (name, replace(name, lambda t: t.to("meta"))) for name in ("candidates", "parents", "draft_probs", "uniforms")
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS) + sorted(DEVICE_MISMATCH) + sorted(NOT_TENSORS))
def test_bad_inputs_name_the_argument(impl, case):
    verify_tree, _ = impl
    name, mutate = {**BAD_INPUTS, **DEVICE_MISMATCH, **NOT_TENSORS}[case]
    args = valid_args()
    verify_tree(**args)  # the unmutated arguments are fine
    mutate(args)
    with pytest.raises(ValueError, match=name):
        verify_tree(**args)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_softmax_rows_are_probabilities(impl, dtype):
    """A bf16 / fp16 model's softmax sums to 1 only within its dtype's rounding (fp16 also flushes a large
    vocabulary's tail to 0): accepted, while rows off by more than that still are not."""
    verify_tree, verify_chain = impl
    g = torch.Generator().manual_seed(0)
    for V in (49152, 128256):
        target = torch.softmax((torch.randn(2, 3, V, generator=g) * 4).to(dtype), -1)
        draft = torch.softmax((torch.randn(2, 2, V, generator=g) * 4).to(dtype), -1)
        tokens = torch.randint(0, V, (2, 2), generator=g)
        output_tokens, num_accepted = verify_chain(tokens, target, draft, generator=g)
        assert ((output_tokens[:, 0] >= 0) & (num_accepted <= 2)).all()
        with pytest.raises(ValueError, match="target_probs rows must sum to 1"):
            verify_chain(tokens, target * 1.05, draft, generator=g)


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_kernel_checks_without_the_wrapper(case):
    name, mutate = BAD_INPUTS[case]
    args = valid_args()
    mutate(args)
    with pytest.raises(ValueError, match=name):
        torch.ops.lightning_spec.verify_tree(*args.values(), False)


def test_chain_bad_inputs_name_the_argument(impl):
    _, verify_chain = impl
    target = torch.full((2, 4, 5), 0.2, dtype=torch.float64)
    with pytest.raises(ValueError, match="draft_tokens"):
        verify_chain(torch.zeros(2, 3), target)
    with pytest.raises(ValueError, match="target_probs"):
        verify_chain(torch.zeros(2, 4, dtype=torch.int64), target)
    with pytest.raises(ValueError, match="draft_probs"):
        verify_chain(torch.zeros(2, 3, dtype=torch.int64), target, target)
    with pytest.raises(ValueError, match="draft_tokens"):
        verify_chain(torch.full((2, 3), 7, dtype=torch.int64), target)


@st.composite
def malformed_inputs(draw):
    B, N, V = (draw(st.integers(0, 3)) for _ in range(3))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))

    def shape(*dims):
        dims = list(dims)
        if draw(st.integers(0, 4)) == 0 and dims:  # now and then a wrong size
            dims[draw(st.integers(0, len(dims) - 1))] += draw(st.sampled_from([-1, 1]))
        return [max(d, 0) for d in dims]

    def integers(*dims, low, high):
        dtype = draw(st.sampled_from([torch.int64, torch.int64, torch.int32, torch.float32]))
        return torch.randint(low, high, shape(*dims), generator=g).to(dtype)

    def probs(*dims, dtype):
        p = torch.rand(shape(*dims), generator=g, dtype=torch.float64)
        p = p / p.sum(-1, keepdim=True).clamp(min=1e-9)
        spoil = draw(st.sampled_from(["none", "none", "nan", "inf", "negative", "scale", "zero"]))
        if p.numel() and spoil != "none":
            flat = p.view(-1)
            flat[int(torch.randint(flat.numel(), (1,), generator=g))] = {
                "nan": float("nan"), "inf": float("inf"), "negative": -0.5, "scale": 3.0, "zero": 0.0
            }[spoil]
        return p.to(dtype)

    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int64]))
    candidates = integers(B, N, low=-1, high=V + 2)
    parents = integers(B, N, low=-2, high=N + 1)
    target = probs(B, N, V, dtype=dtype)
    draft = probs(B, draw(st.sampled_from([N, N - 1])), V, dtype=dtype) if draw(st.booleans()) else None
    uniforms = None
    if draw(st.booleans()):
        uniforms = (torch.rand(shape(B, N + 1), generator=g, dtype=torch.float64) * 1.2 - 0.1).to(
            draw(st.sampled_from([torch.float64, torch.float64, torch.float32]))
        )
    return candidates, parents, target, draft, uniforms, draw(st.booleans())


@settings(max_examples=300, deadline=None)
@given(malformed_inputs())
def test_fuzz_kernel_raises_or_returns_well_formed(inputs):
    candidates, parents, target, draft, uniforms, greedy = inputs
    try:
        accepted, num_accepted, next_token = torch.ops.lightning_spec.verify_tree(*inputs)
    except ValueError:
        return
    B, N, V = target.shape
    assert accepted.shape == (B, N) and num_accepted.shape == (B,) and next_token.shape == (B,)
    assert ((next_token >= 0) & (next_token < V)).all() and ((num_accepted >= 0) & (num_accepted < N)).all()
    assert (accepted[:, 0] == 0).all()


# ---------------------------------------------------------------- the CUDA kernel compiles


# ---------------------------------------------------------------- CUDA (runs where a GPU and a CUDA build exist)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["greedy", "draft_probs", "one_hot"])
@pytest.mark.parametrize("seed", range(4))
def test_cuda_equals_cpu_bit_for_bit(dtype, mode, seed):
    candidates, parents, target, draft, uniforms = random_inputs(seed, B=64, V=300, dtype=dtype, N=16)
    draft = draft if mode == "draft_probs" else None
    kwargs = dict(greedy=mode == "greedy", uniforms=uniforms)
    cpu = ops.verify_tree(candidates, parents, target, draft, **kwargs)
    to_gpu = lambda t: t.cuda() if t is not None else None  # noqa: E731
    gpu = ops.verify_tree(*map(to_gpu, (candidates, parents, target, draft)), greedy=kwargs["greedy"], uniforms=uniforms.cuda())
    for got, want in zip(gpu, cpu):
        assert got.is_cuda and torch.equal(got.cpu(), want)


@needs_cuda
def test_cuda_rejects_bad_input_by_name():
    candidates, parents, target, draft, uniforms = random_inputs(0, V=50, N=6)
    args = [t.cuda() for t in (candidates, parents, target)]
    bad_target = args[2].clone()
    bad_target[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="target_probs"):
        ops.verify_tree(args[0], args[1], bad_target, greedy=True)
    bad_parents = args[1].clone()
    bad_parents[0, -1] = 99
    with pytest.raises(ValueError, match="parents"):
        ops.verify_tree(args[0], bad_parents, args[2], greedy=True)
    with pytest.raises(ValueError, match="candidates is on cpu"):
        ops.verify_tree(candidates, args[1], args[2], greedy=True)
