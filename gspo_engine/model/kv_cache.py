"""Key / value cache for generation: a fixed pool of slots, preallocated once and written in place.

Each slot holds one sequence from column 0, so a token's column is its position; `lengths`
(int64 [slots], on the device) counts the columns a slot holds. Qwen3Model.forward_hidden reaches
the pool through one of two views, which it uses as its `cache` (attention_mask, layers, advance):

- `prefill(slots, prompt_lengths)`: right-padded prompts [n, T] written at columns 0..T-1 of the
  given slots; each token attends to its own prompt's earlier tokens.
- `decode(rows, columns)`: one token for each of slots 0..rows-1, written at the slot's own next
  column; it attends to the first `columns` columns under a per-slot mask. Its shapes depend on
  (rows, columns) alone and no value travels to the host, so a decode step can be captured as a
  CUDA graph, and a slot can be refilled with a new sequence between two steps.

`move` copies slots onto others, so that the sequences still running fill the first rows.
"""

from __future__ import annotations

import weakref

import torch

from gspo_engine.model.args import ModelArgs


# The caches of models whose layers keep more than keys and values, by ModelArgs.architecture. Each registers
# itself where it is defined (model/hybrid_cache.py: Qwen3-Next / Qwen3.5), so that this module imports none.
STATEFUL_CACHES: dict[str, type["KVCache"]] = {}


def slot_bytes(args: ModelArgs, capacity: int, dtype: torch.dtype) -> int:
    """Bytes of one slot of `capacity` columns: keys and values of every layer, and its length."""
    if args.architecture in STATEFUL_CACHES:
        return STATEFUL_CACHES[args.architecture].slot_bytes(args, capacity, dtype)
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * args.num_hidden_layers * args.num_key_value_heads * args.head_dim * capacity * element + 8


class KVCache:
    """keys / values [slots, kv_heads, capacity, head_dim] per layer; lengths int64 [slots]."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], lengths: torch.Tensor):
        self.keys, self.values, self.lengths = keys, values, lengths
        self.slots, self.capacity = lengths.shape[0], keys[0].shape[2]

    @classmethod
    def allocate(
        cls, args: ModelArgs, slots: int, capacity: int, dtype: torch.dtype, device: torch.device
    ) -> "KVCache":
        if cls is KVCache and args.architecture in STATEFUL_CACHES:
            return STATEFUL_CACHES[args.architecture].allocate(args, slots, capacity, dtype, device)
        shape = (slots, args.num_key_value_heads, capacity, args.head_dim)
        layers = range(args.num_hidden_layers)
        return cls(
            [torch.zeros(shape, dtype=dtype, device=device) for _ in layers],
            [torch.zeros(shape, dtype=dtype, device=device) for _ in layers],
            torch.zeros(slots, dtype=torch.long, device=device),
        )

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values) + self.lengths.numel() * 8

    def prefill(self, slots: torch.Tensor, prompt_lengths: torch.Tensor) -> "PrefillView":
        """The view a forward of right-padded prompts [n, T] writes through: slots, prompt_lengths int64 [n]."""
        return PrefillView(self, slots, prompt_lengths)

    def decode(self, rows: int, columns: int) -> "DecodeView":
        """The view a one-token forward of slots 0..rows-1 writes through, attending to `columns` columns."""
        if not 0 < rows <= self.slots or not 0 < columns <= self.capacity:
            raise ValueError(f"a decode view of {rows} rows x {columns} columns does not fit "
                             f"{self.slots} slots x {self.capacity} columns")
        return DecodeView(self, rows, columns)

    def move(self, source: torch.Tensor, target: torch.Tensor, columns: int) -> None:
        """Copy the first `columns` columns and the lengths of slots `source` onto slots `target` [n] int64."""
        for layer in self.keys + self.values:
            layer[target, :, :columns] = layer[source, :, :columns]
        self.lengths[target] = self.lengths[source]


class LayerKVCache:
    """One layer's share of a view: `update(k, v)` writes the new keys and values and returns what to attend to."""

    def __init__(self, view, keys: torch.Tensor, values: torch.Tensor):
        # A weak reference: with a strong one, view and layers form a cycle that only the garbage
        # collector frees, so a finished rollout's cache (gigabytes) could outlive it into the update.
        self.view, self.keys, self.values = weakref.proxy(view), keys, values

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.view.write(self.keys, self.values, k, v)


class PrefillView:
    """Prompts [n, T], right-padded, into columns 0..T-1 of `slots`; the slots' lengths become the prompts'."""

    def __init__(self, cache: KVCache, slots: torch.Tensor, prompt_lengths: torch.Tensor):
        self.cache, self.slots, self.prompt_lengths = cache, slots, prompt_lengths
        self.layers = [LayerKVCache(self, k, v) for k, v in zip(cache.keys, cache.values)]

    def attention_mask(self, attention_mask: torch.Tensor | None, seq: int) -> torch.Tensor:
        """bool [n, 1, T, T]: causal over the prompt's own tokens; a padding query attends to itself only."""
        if seq > self.cache.capacity:
            raise ValueError(f"the cache holds {self.cache.capacity} positions; {seq} were asked for")
        device = self.slots.device
        columns = torch.arange(seq, device=device)
        real = columns[None, :] < self.prompt_lengths[:, None]
        causal = columns[None, :] <= columns[:, None]
        diagonal = columns[None, :] == columns[:, None]
        return (causal & real[:, None, None, :]) | diagonal

    def write(self, keys, values, k, v):
        # In the cache's dtype (autocast's), as the decode steps will read them.
        k, v = k.to(keys.dtype), v.to(values.dtype)
        seq = k.shape[2]
        keys[self.slots, :, :seq] = k
        values[self.slots, :, :seq] = v
        return k, v

    def advance(self, seq: int) -> None:
        self.cache.lengths[self.slots] = self.prompt_lengths


class DecodeView:
    """One token per slot 0..rows-1, at the slot's own column; attends to columns 0..columns-1.

    A slot's column is its length, clamped to the last column: a slot whose sequence has ended
    keeps decoding until the host looks (its tokens are discarded) and must not write past the end.
    """

    def __init__(self, cache: KVCache, rows: int, columns: int):
        self.cache, self.rows, self.columns = cache, rows, columns
        self.layers = [LayerKVCache(self, k, v) for k, v in zip(cache.keys, cache.values)]
        self.row_index = torch.arange(rows, device=cache.lengths.device)
        self.column_index = cache.lengths[:rows].clamp(max=cache.capacity - 1)

    def attention_mask(self, attention_mask: torch.Tensor | None, seq: int) -> torch.Tensor:
        """bool [rows, 1, 1, columns]: the slot's columns up to and including the one written now."""
        if seq != 1 or attention_mask is not None:
            raise ValueError("a decode view takes one real token per row")
        columns = torch.arange(self.columns, device=self.row_index.device)
        return (columns[None, :] <= self.column_index[:, None])[:, None, None, :]

    def write(self, keys, values, k, v):
        keys[self.row_index, :, self.column_index] = k[:, :, 0].to(keys.dtype)
        values[self.row_index, :, self.column_index] = v[:, :, 0].to(values.dtype)
        return keys[: self.rows, :, : self.columns], values[: self.rows, :, : self.columns]

    def advance(self, seq: int) -> None:
        self.cache.lengths[: self.rows] = (self.column_index + 1).clamp(max=self.cache.capacity - 1)
