"""A transformers causal LM with a KV cache that can take back what it was fed.

Every forward appends its tokens to the cache at the same slots for all rows. A slot stays in the cache for good,
but a token is visible to later queries only once it is *committed*: a rejected draft token is simply never
committed, so rollback costs nothing and rows may accept different numbers of tokens (ragged batches). The
attention mask and position ids are built here from the committed slots, so positions count committed tokens only.
When rejected slots outnumber the committed ones, `compact` gathers each row's committed slots to the front.
Sliding-window layers (Mistral, Gemma 2/3, Qwen with use_sliding_window) keep every slot too: their mask also hides
keys at or beyond the window, counted in positions (committed tokens), not in slots.
"""
import time
from typing import Optional

import torch
from torch import Tensor
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, get_layer_types_and_kwargs

from lightning_spec.decoding.attention import grouped_attention


class GrowingLayer(DynamicLayer):
    """A DynamicLayer whose keys and values are views into buffers with room to grow (doubling), so an eager forward
    writes its new slots in place instead of copying the whole cache (`torch.cat`) every step. A forward traced by
    torch.compile appends by cat, as DynamicLayer does (its graphs cannot hold views of buffers that outgrow them)."""

    _keys: Optional[Tensor] = None  # the buffers; keys/values are their first slots while they are in use
    _values: Optional[Tensor] = None

    def _hold(self, keys: Tensor, values: Tensor, room: int = 0) -> None:
        """Copy ``keys``/``values`` [B, H, n, D] into new buffers of n + ``room`` slots."""
        B, H, n, D = keys.shape
        self._keys = keys.new_empty(B, H, n + room, D)
        self._values = values.new_empty(B, H, n + room, values.shape[-1])
        self._keys[:, :, :n] = keys
        self._values[:, :, :n] = values
        self.keys, self.values = self._keys[:, :, :n], self._values[:, :, :n]

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs):
        if torch.compiler.is_compiling():
            return super().update(key_states, value_states, *args, **kwargs)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.keys, self.values = key_states[:, :, :0], value_states[:, :, :0]
        n, q = self.keys.shape[2], key_states.shape[2]
        in_buffer = self._keys is not None and self.keys.data_ptr() == self._keys.data_ptr()
        if not in_buffer or n + q > self._keys.shape[2]:
            self._hold(self.keys, self.values, room=max(n, 64) + q)
        self._keys[:, :, n : n + q] = key_states
        self._values[:, :, n : n + q] = value_states
        self.keys, self.values = self._keys[:, :, : n + q], self._values[:, :, : n + q]
        return self.keys, self.values


def attention_windows(config) -> dict:
    """{layer type: sliding window or None} of a model's attention layers ("full_attention" / "sliding_attention",
    as transformers' DynamicCache reads them from the config); other kinds (chunked, recurrent, shared) are refused."""
    types, kwargs = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
    windows = {}
    for kind, extra in zip(types, kwargs):
        window = extra.get("sliding_window") if kind == "sliding_attention" else None
        if kind not in ("full_attention", "sliding_attention") or windows.get(kind, window) != window:
            raise ValueError(f"the decoding engine takes full-attention and sliding-window layers (one window); "
                             f"{config.model_type} has {kind!r} layers{f' of window {window}' if window else ''}")
        windows[kind] = window
    return windows


class CachedLM:
    def __init__(self, model, batch_size: int, device: torch.device):
        self.model = model
        self.windows = attention_windows(model.config)
        self.cache = DynamicCache(config=model.config)
        self.cache.layers = [GrowingLayer() for _ in self.cache.layers]  # sliding layers too: every slot stays
        self.committed = torch.zeros(batch_size, 0, dtype=torch.bool, device=device)  # [B, slots]
        self.positions = torch.zeros(batch_size, 0, dtype=torch.long, device=device)  # [B, slots]: each slot's position
        self.length = torch.zeros(batch_size, dtype=torch.long, device=device)  # committed tokens per row
        self._min = torch.finfo(model.dtype).min
        self.seconds = 0.0  # time spent in forward, for cost ratios

    @property
    def slots(self) -> int:
        return self.committed.shape[1]

    def forward(self, tokens: Tensor, positions: Tensor, see_new: Tensor, see_old: Optional[Tensor] = None, logits_to_keep: int = 0) -> Tensor:
        """Append ``tokens`` [B, q] at ``positions`` [B, q] and return their logits [B, q or logits_to_keep, V].

        A query sees the committed slots, the old slots in ``see_old`` [B or 1, q, slots] (uncommitted draft
        nodes of the tree being built) and the new tokens in ``see_new`` [B or 1, q, q]. Nothing is committed.
        """
        B, q = tokens.shape
        old = self.committed[:, None, :].expand(B, q, self.slots)
        if see_old is not None:
            old = old | see_old
        visible = torch.cat([old, see_new.expand(B, q, q)], dim=2)
        self.positions = torch.cat([self.positions, positions.expand(B, q)], dim=1)
        masks = {kind: self._additive(visible, window, positions.expand(B, q)) for kind, window in self.windows.items()}
        # one kind: a plain 4D mask (what Mistral and Phi-3 take); both: transformers' per-kind mapping
        mask = next(iter(masks.values())) if len(masks) == 1 else masks
        if logits_to_keep:
            # indices, not transformers' int (a slice): the slice is a strided view of the hidden states, which
            # CPU bf16 matmul multiplies with the head by broadcasting it per row (8 GB and ~10 s at B=160)
            logits_to_keep = torch.arange(q - logits_to_keep, q, device=tokens.device)
        start = time.perf_counter()
        with grouped_attention(self.model):
            out = self.model(
                input_ids=tokens, attention_mask=mask, position_ids=positions,
                cache=self.cache, use_cache=True, logits_to_keep=logits_to_keep,
            )
        self.committed = torch.cat([self.committed, self.committed.new_zeros(B, q)], dim=1)
        logits = out.logits.float()
        if logits.is_cuda:
            torch.cuda.synchronize(logits.device)  # the time belongs to this model
        self.seconds += time.perf_counter() - start
        return logits

    def _additive(self, visible: Tensor, window: Optional[int], positions: Tensor) -> Tensor:
        """[B, 1, q, slots] float mask: 0 where visible, the dtype's min elsewhere; a sliding window also hides keys
        ``window`` or more positions behind the query (transformers' ``kv_idx > q_idx - window``)."""
        if window is not None:
            visible = visible & (positions[:, :, None] - self.positions[:, None, :] < window)
        return torch.zeros(visible.shape, dtype=self.model.dtype, device=visible.device).masked_fill_(~visible, self._min)[:, None]

    def commit(self, keep: Tensor) -> None:
        """Commit the last ``keep.shape[1]`` slots where ``keep`` [B, k] is true."""
        k = keep.shape[1]
        self.committed[:, self.slots - k :] |= keep
        self.length += keep.sum(1)

    def select(self, rows: Tensor) -> None:
        """Keep only ``rows`` of the batch (finished rows leave)."""
        for layer in self.cache.layers:
            if not layer.is_initialized:
                continue
            layer.keys, layer.values = layer.keys[rows], layer.values[rows]
        self.committed, self.length, self.positions = self.committed[rows], self.length[rows], self.positions[rows]

    def compact(self) -> None:
        """Move each row's committed slots to the front (left-padded) once rejected slots dominate."""
        kept = int(self.length.max())
        if self.slots <= 2 * kept + 64:
            return
        order = torch.arange(self.slots, device=self.committed.device)
        # committed slots last, in order: the top `kept` of this key are each row's committed slots, left-padded
        key = torch.where(self.committed, order + self.slots, order)
        index = key.topk(kept, dim=1, sorted=True).indices.flip(1)  # [B, kept] ascending slot order
        for layer in self.cache.layers:
            if not layer.is_initialized:
                continue
            B, H, _, D = layer.keys.shape
            gather = index[:, None, :, None].expand(B, H, kept, D)
            layer.keys, layer.values = layer.keys.gather(2, gather), layer.values.gather(2, gather)
        self.committed, self.positions = self.committed.gather(1, index), self.positions.gather(1, index)
