"""Static draft trees: a tree is the list of each node's parent, node 0 the root (the last committed token).

Children of a node are ranked by index: the first child gets the draft's most likely token, the second the next
one, and so on (top-k children). A chain of gamma draft tokens is ``chain(gamma)`` = [-1, 0, 1, ..., gamma - 1].
"""
from dataclasses import dataclass
from typing import List, Sequence

import torch


def chain(gamma: int) -> List[int]:
    """Parents of a chain of ``gamma`` draft tokens."""
    if not isinstance(gamma, int) or gamma < 1:
        raise ValueError(f"gamma must be an integer >= 1, got {gamma!r}")
    return list(range(-1, gamma))


def topk_tree(branching: Sequence[int]) -> List[int]:
    """Parents of the full tree that expands every node at depth d into its top ``branching[d]`` children.

    Example: ``topk_tree([2, 2, 1])`` has 2 + 4 + 4 = 10 draft nodes and depth 3.
    """
    if not branching or any(not isinstance(k, int) or k < 1 for k in branching):
        raise ValueError(f"branching must be a non-empty list of integers >= 1, got {list(branching)!r}")
    parents, level = [-1], [0]
    for k in branching:
        nxt = []
        for node in level:
            for _ in range(k):
                nxt.append(len(parents))
                parents.append(node)
        level = nxt
    return parents


@dataclass(frozen=True)
class TreeLayout:
    """Everything the engine derives from a parents list, once per call."""

    parents: torch.Tensor  # int64 [N]
    depth: torch.Tensor  # int64 [N], root 0
    ancestors: torch.Tensor  # bool [N, N]: ancestors[i, j] = node j is node i or one of its ancestors
    rank: List[int]  # rank of each node among its siblings (0 = the draft's top choice)
    children: List[List[int]]  # children of each node, in rank order
    levels: List[List[int]]  # nodes at depth 1, 2, ..., max_depth

    @property
    def size(self) -> int:
        return len(self.rank)

    @property
    def max_depth(self) -> int:
        return len(self.levels)

    @classmethod
    def from_parents(cls, parents: Sequence[int]) -> "TreeLayout":
        parents = [int(p) for p in parents]
        if len(parents) < 2 or parents[0] != -1:
            raise ValueError(f"tree must list each node's parent, starting with -1 for the root and at least one draft node, got {parents!r}")
        bad = [i for i, p in enumerate(parents[1:], 1) if not 0 <= p < i]
        if bad:
            raise ValueError(f"tree: node {bad[0]} has parent {parents[bad[0]]}; parents must satisfy 0 <= parent < node")
        N = len(parents)
        depth, children, rank = [0] * N, [[] for _ in range(N)], [0] * N
        ancestors = torch.eye(N, dtype=torch.bool)
        for i in range(1, N):
            p = parents[i]
            depth[i] = depth[p] + 1
            rank[i] = len(children[p])
            children[p].append(i)
            ancestors[i] |= ancestors[p]
        levels = [[i for i in range(N) if depth[i] == d] for d in range(1, max(depth) + 1)]
        return cls(torch.tensor(parents), torch.tensor(depth), ancestors, rank, children, levels)
