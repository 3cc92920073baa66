"""Speculative decoding engine: chain and static-tree drafts verified by the compiled ops, KV rollback, batches."""
from lightning_spec.decoding.linear import SmallBatchLinear, use_small_batch_linear
from lightning_spec.decoding.engine import DecodingStats, GenerationOutput, speculative_generate, target_generate, warp
from lightning_spec.decoding.tree import TreeLayout, chain, topk_tree

__all__ = ["DecodingStats", "GenerationOutput", "SmallBatchLinear", "TreeLayout", "chain", "speculative_generate", "target_generate", "topk_tree", "use_small_batch_linear", "warp"]
