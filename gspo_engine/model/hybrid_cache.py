"""The generation cache of the hybrid models: keys / values for the full-attention layers, states for the others.

A Gated DeltaNet layer needs no keys or values: what it remembers of a sequence is the last
W - 1 inputs of its convolution (conv [slots, conv_dim, W - 1], in the cache's dtype) and the
recurrent state (fp32 [slots, HV, K, V]), a fixed size whatever the length. HybridCache keeps
KVCache's slots, views and moves (model/kv_cache.py), with both kinds side by side: a view's
`layers[i]` is a LayerKVCache for a full-attention layer and a LinearStateView for a linear one.
"""

from __future__ import annotations

import weakref

import torch

from gspo_engine.model.args import HYBRID_ARCHITECTURES, ModelArgs
from gspo_engine.model.kv_cache import STATEFUL_CACHES, DecodeView, KVCache, LayerKVCache, PrefillView


def linear_state_shapes(args: ModelArgs) -> tuple[tuple[int, int], tuple[int, int, int]]:
    """Per slot and linear layer: conv [conv_dim, W - 1] and recurrent [HV, K, V]."""
    conv_dim = 2 * args.linear_num_key_heads * args.linear_key_head_dim + (
        args.linear_num_value_heads * args.linear_value_head_dim
    )
    return (conv_dim, args.linear_conv_kernel_dim - 1), (
        args.linear_num_value_heads, args.linear_key_head_dim, args.linear_value_head_dim
    )


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """The recurrent state's dtype: fp32 (fp64 for an fp64 model), as the delta rule computes it."""
    return torch.promote_types(dtype, torch.float32)


def hybrid_slot_bytes(args: ModelArgs, capacity: int, dtype: torch.dtype) -> int:
    """Bytes of one slot: keys and values of the full-attention layers, the states of the linear ones, its length."""
    element = torch.empty((), dtype=dtype).element_size()
    linear = len(args.linear_attention_layers)
    full = args.num_hidden_layers - linear
    (conv_dim, history), (heads, k_dim, v_dim) = linear_state_shapes(args)
    state_element = torch.empty((), dtype=state_dtype(dtype)).element_size()
    kv = 2 * full * args.num_key_value_heads * args.head_dim * capacity * element
    return kv + linear * (conv_dim * history * element + heads * k_dim * v_dim * state_element) + 8


class HybridCache(KVCache):
    """KVCache over the full-attention layers plus conv / recurrent states of the linear ones, per slot."""

    def __init__(self, args: ModelArgs, keys: dict[int, torch.Tensor], values: dict[int, torch.Tensor],
                 conv: dict[int, torch.Tensor], recurrent: dict[int, torch.Tensor], lengths: torch.Tensor,
                 capacity: int):
        # Indexed by layer; KVCache's own lists hold the attention layers' tensors for move and nbytes.
        self.layer_keys, self.layer_values = keys, values
        self.conv, self.recurrent = conv, recurrent
        self.num_layers = args.num_hidden_layers
        self.keys, self.values, self.lengths = list(keys.values()), list(values.values()), lengths
        self.slots, self.capacity = lengths.shape[0], capacity

    @classmethod
    def allocate(
        cls, args: ModelArgs, slots: int, capacity: int, dtype: torch.dtype, device: torch.device
    ) -> "HybridCache":
        kv_shape = (slots, args.num_key_value_heads, capacity, args.head_dim)
        (conv_dim, history), recurrent_shape = linear_state_shapes(args)
        linear = set(args.linear_attention_layers)
        full = [layer for layer in range(args.num_hidden_layers) if layer not in linear]

        def zeros(shape, of=dtype):
            return torch.zeros(shape, dtype=of, device=device)

        return cls(
            args,
            {layer: zeros(kv_shape) for layer in full},
            {layer: zeros(kv_shape) for layer in full},
            {layer: zeros((slots, conv_dim, history)) for layer in sorted(linear)},
            {layer: zeros((slots, *recurrent_shape), state_dtype(dtype)) for layer in sorted(linear)},
            torch.zeros(slots, dtype=torch.long, device=device),
            capacity,
        )

    @staticmethod
    def slot_bytes(args: ModelArgs, capacity: int, dtype: torch.dtype) -> int:
        return hybrid_slot_bytes(args, capacity, dtype)

    @property
    def nbytes(self) -> int:
        states = list(self.conv.values()) + list(self.recurrent.values())
        return super().nbytes + sum(t.numel() * t.element_size() for t in states)

    def prefill(self, slots: torch.Tensor, prompt_lengths: torch.Tensor) -> "HybridPrefillView":
        return HybridPrefillView(self, slots, prompt_lengths)

    def decode(self, rows: int, columns: int) -> "HybridDecodeView":
        if not 0 < rows <= self.slots or not 0 < columns <= self.capacity:
            raise ValueError(f"a decode view of {rows} rows x {columns} columns does not fit "
                             f"{self.slots} slots x {self.capacity} columns")
        return HybridDecodeView(self, rows, columns)

    def move(self, source: torch.Tensor, target: torch.Tensor, columns: int) -> None:
        super().move(source, target, columns)
        for state in list(self.conv.values()) + list(self.recurrent.values()):
            state[target] = state[source]

    def view_layers(self, view, rows) -> list:
        """One entry per layer: a LayerKVCache (attention) or a LinearStateView over `rows` of the slots."""
        return [
            LinearStateView(view, self.conv[layer], self.recurrent[layer], rows) if layer in self.conv
            else LayerKVCache(view, self.layer_keys[layer], self.layer_values[layer])
            for layer in range(self.num_layers)
        ]


class LinearStateView:
    """One Gated DeltaNet layer's states in a view: `read` what its rows continue from, `write` what they end in.

    rows: int64 slot indices (a prefill: they start from zero states) or a slice 0..rows-1 (a decode step).
    """

    def __init__(self, view, conv: torch.Tensor, recurrent: torch.Tensor, rows: torch.Tensor | slice):
        self.view, self.conv, self.recurrent, self.rows = weakref.proxy(view), conv, recurrent, rows

    def read(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if isinstance(self.rows, torch.Tensor):
            return None, None
        return self.conv[self.rows], self.recurrent[self.rows]

    def write(self, conv: torch.Tensor, recurrent: torch.Tensor) -> None:
        self.conv[self.rows] = conv.to(self.conv.dtype)
        self.recurrent[self.rows] = recurrent.to(self.recurrent.dtype)


class HybridPrefillView(PrefillView):
    def __init__(self, cache: HybridCache, slots: torch.Tensor, prompt_lengths: torch.Tensor):
        self.cache, self.slots, self.prompt_lengths = cache, slots, prompt_lengths
        self.layers = cache.view_layers(self, slots)


class HybridDecodeView(DecodeView):
    def __init__(self, cache: HybridCache, rows: int, columns: int):
        self.cache, self.rows, self.columns = cache, rows, columns
        self.layers = cache.view_layers(self, slice(0, rows))
        self.row_index = torch.arange(rows, device=cache.lengths.device)
        self.column_index = cache.lengths[:rows].clamp(max=cache.capacity - 1)


# KVCache.allocate and slot_bytes hand the hybrid models to HybridCache (the package imports this module).
STATEFUL_CACHES.update(dict.fromkeys(HYBRID_ARCHITECTURES, HybridCache))
