"""Static key / value cache for generation, preallocated once and written in place by column (gpt-fast style).

A batch is left-padded, so every row writes the same cache column at each step; which columns
hold real tokens is kept per row in `key_mask`, and padding columns are never attended to. Rows
that have finished are dropped with `keep_rows`, which moves the remaining rows to the front of
the same storage, so later steps only compute the rows still generating.
"""

from __future__ import annotations

import weakref

import torch

from gspo_engine.model.args import ModelArgs


class KVCache:
    """keys / values [B, kv_heads, max_len, head_dim] per layer, key_mask bool [B, max_len].

    `length` columns are written; `batch_size` rows are in use (the first ones of the storage).
    """

    def __init__(self, key_mask: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor]):
        self.max_len = key_mask.shape[1]
        self.batch_size = key_mask.shape[0]
        self.length = 0
        self.key_mask = key_mask
        self.layers = [LayerKVCache(self, layer_keys, layer_values) for layer_keys, layer_values in zip(keys, values)]

    @classmethod
    def allocate(
        cls, args: ModelArgs, batch_size: int, max_len: int, dtype: torch.dtype, device: torch.device
    ) -> "KVCache":
        shape = (batch_size, args.num_key_value_heads, max_len, args.head_dim)
        layers = range(args.num_hidden_layers)
        return cls(
            torch.zeros(batch_size, max_len, dtype=torch.bool, device=device),
            [torch.zeros(shape, dtype=dtype, device=device) for _ in layers],
            [torch.zeros(shape, dtype=dtype, device=device) for _ in layers],
        )

    def row_slice(self, start: int, end: int) -> "KVCache":
        """An empty cache over rows start..end-1 of this one's storage, to prefill those rows on their own.

        Its tensors are views: what a forward writes through it lands in this cache, whose
        `advance` then marks the columns written once every slice is done.
        """
        return KVCache(
            self.key_mask[start:end],
            [layer.keys[start:end] for layer in self.layers],
            [layer.values[start:end] for layer in self.layers],
        )

    def attention_mask(self, attention_mask: torch.Tensor | None, seq: int) -> torch.Tensor:
        """Record the padding of `seq` new columns; bool [B, 1, seq, length + seq], True where a query may attend.

        attention_mask [B, seq] (1 = token, 0 = padding) or None when every new token is real.
        Causal over the cache columns; a padding query attends to itself only, as in
        attention_mask_4d, so that it gives no NaN.
        """
        start, end = self.length, self.length + seq
        if end > self.max_len:
            raise ValueError(f"the cache holds {self.max_len} positions; {end} were asked for")
        rows = self.batch_size
        new_keys = self.key_mask[:rows, start:end]
        if attention_mask is None:
            new_keys.fill_(True)
        else:
            new_keys.copy_(attention_mask.bool())
        query_columns = torch.arange(start, end, device=self.key_mask.device)[:, None]
        key_columns = torch.arange(end, device=self.key_mask.device)[None, :]
        causal = key_columns <= query_columns
        diagonal = key_columns == query_columns
        return (causal & self.key_mask[:rows, None, None, :end]) | diagonal

    def advance(self, seq: int) -> None:
        """Mark the `seq` columns every layer has just written as filled."""
        self.length += seq

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep only `rows` (int64 indices into the rows in use), moved to the front in that order."""
        end = self.length
        self.key_mask[: rows.numel(), :end] = self.key_mask[rows, :end]
        for layer in self.layers:
            layer.keys[: rows.numel(), :, :end] = layer.keys[rows, :, :end]
            layer.values[: rows.numel(), :, :end] = layer.values[rows, :, :end]
        self.batch_size = rows.numel()


class LayerKVCache:
    """One layer's share of a KVCache."""

    def __init__(self, cache: KVCache, keys: torch.Tensor, values: torch.Tensor):
        # A weak reference: with a strong one, cache and layers form a cycle that only the garbage
        # collector frees, so a finished rollout's cache (gigabytes) could outlive it into the update.
        self.cache = weakref.proxy(cache)
        self.keys = keys
        self.values = values

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, kv_heads, T, head_dim] at the next T columns.

        Returns all keys and values so far, [B, kv_heads, length + T, head_dim].
        """
        rows, start = self.cache.batch_size, self.cache.length
        end = start + k.shape[2]
        self.keys[:rows, :, start:end] = k
        self.values[:rows, :, start:end] = v
        return self.keys[:rows, :, :end], self.values[:rows, :, :end]
