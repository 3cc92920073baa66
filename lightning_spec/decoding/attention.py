"""Grouped-query attention for the engine's multi-token forwards, without copying the KV cache per query head.

With a mask and more than one query token (every verification, and a draft's catch-up on two tokens),
transformers' SDPA path repeats each key/value head for the query heads that share it (`repeat_kv`): a copy of the
layer's whole cache per call. Here those query heads are stacked along the query axis instead, their mask rows
repeated alongside, as transformers itself does for a single query token (`pack_gqa`). The numbers are SDPA's on
the same scores. The repeated mask (groups x q x L) outgrows the repeated cache (2 x heads x L x head_dim) on long
queries, so those (a long prompt's prefill) keep transformers' path.
"""
import contextlib
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

NAME = "lightning_spec_grouped_sdpa"


def grouped_sdpa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """transformers' attention-function signature: query [B, H, q, D], key/value [B, H_kv, L, D], attention_mask
    [B or 1, 1, q, L]; returns ([B, q, H, D], None)."""
    groups = getattr(module, "num_key_value_groups", 1)
    batch, heads, q, dim = query.shape
    plain = groups == 1 or q == 1 or groups * q >= heads * dim  # the repeated mask would reach half the repeated cache
    plain = plain or attention_mask is None or attention_mask.dim() != 4 or attention_mask.shape[1] != 1
    if plain or any(kwargs.get(k) is not None for k in ("s_aux", "softcap", "position_bias")):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    packed = query.reshape(batch, heads // groups, groups * q, dim)  # head h * groups + g -> rows g * q .. g * q + q - 1
    out = F.scaled_dot_product_attention(packed, key, value, attn_mask=_repeated(attention_mask, groups), dropout_p=dropout,
                                         scale=scaling)
    return out.reshape(batch, heads, q, value.shape[-1]).transpose(1, 2).contiguous(), None


# Inside grouped_attention: (id of a mask, groups) -> (that mask, kept alive so the id stays its own, its repeat). Every
# layer of a forward gets the same mask, so it is repeated once per forward instead of once per layer. Not under
# torch.compile: its guards on the id would recompile the model for every new mask.
_repeats: Optional[dict] = None


def _repeated(mask: Tensor, groups: int) -> Tensor:
    if _repeats is None or torch.compiler.is_compiling():
        return mask.repeat(1, 1, groups, 1)
    key = (id(mask), groups)
    if key not in _repeats:
        _repeats[key] = (mask, mask.repeat(1, 1, groups, 1))
    return _repeats[key][1]


AttentionInterface.register(NAME, grouped_sdpa_attention)
AttentionMaskInterface.register(NAME, sdpa_mask)


@contextlib.contextmanager
def grouped_attention(model):
    """Run ``model`` (set to transformers' "sdpa") with grouped_sdpa_attention for the duration; any other
    attention implementation is left as it is."""
    config = model.config
    if config._attn_implementation != "sdpa":
        yield
        return
    global _repeats
    outer, _repeats = _repeats, {}
    config._attn_implementation = NAME
    try:
        yield
    finally:
        config._attn_implementation = "sdpa"
        _repeats = outer
