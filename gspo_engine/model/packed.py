"""Sequences packed into one row without padding, and causal attention that stays inside each of them.

A packed forward takes input_ids [1, N], the S sequences laid end to end, with position ids that
restart at 0 at each sequence's start (`PackedSequences.position_ids`). Everything but attention
(and the state of recurrent layers) is per token, so it needs no change; attention must never let
a token see an earlier sequence. The layout is flash-attn's varlen one: boundaries as cu_seqlens
[S + 1] int32, sequence i spanning columns cu_seqlens[i]:cu_seqlens[i + 1].

Three implementations of the same attention, chosen per device:
- "segments": scaled_dot_product_attention once per sequence, causal. Exact, no wasted work,
  one call per sequence and layer: the CPU path, and a fallback anywhere.
- "flash_varlen": flash-attn's flash_attn_varlen_func, on CUDA for bf16 / fp16 when installed.
- "flex": torch's FlexAttention with a document mask, compiled, on CUDA otherwise: it skips the
  blocks the mask removes, so its cost follows the real tokens, not N^2.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

BACKENDS = ("segments", "flash_varlen", "flex")


@dataclass(eq=False)
class PackedSequences:
    """Where each of S sequences lies in a packed row of `total` tokens.

    lengths: the sequences' token counts, on the host (loops and the longest need them without a
    device sync); cu_seqlens: int32 [S + 1] on the row's device, 0 then the running sum.
    """

    lengths: tuple[int, ...]
    cu_seqlens: torch.Tensor
    _block_mask: object = field(default=None, repr=False)

    @classmethod
    def from_lengths(cls, lengths: list[int] | tuple[int, ...], device: torch.device | str = "cpu") -> "PackedSequences":
        lengths = tuple(int(n) for n in lengths)
        if not lengths:
            raise ValueError("a packed row needs at least one sequence")
        if min(lengths) < 1:
            raise ValueError(f"every packed sequence needs at least one token, got lengths {list(lengths)}")
        cu_seqlens = torch.zeros(len(lengths) + 1, dtype=torch.int32)
        cu_seqlens[1:] = torch.tensor(lengths).cumsum(0)
        return cls(lengths, cu_seqlens.to(device))

    @property
    def total(self) -> int:
        return sum(self.lengths)

    @property
    def max_length(self) -> int:
        return max(self.lengths)

    @property
    def starts(self) -> list[int]:
        starts, position = [], 0
        for length in self.lengths:
            starts.append(position)
            position += length
        return starts

    def position_ids(self) -> torch.Tensor:
        """[1, total] int64: 0..n-1 within each sequence, as each would have on its own."""
        device = self.cu_seqlens.device
        return torch.cat([torch.arange(n, device=device) for n in self.lengths])[None]

    def document_ids(self) -> torch.Tensor:
        """[total] int32: the index of the sequence each column belongs to."""
        lengths = torch.tensor(self.lengths, device=self.cu_seqlens.device)
        return torch.repeat_interleave(torch.arange(len(self.lengths), device=lengths.device, dtype=torch.int32),
                                       lengths)

    def check_row(self, input_ids: torch.Tensor) -> None:
        if input_ids.dim() != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] != self.total:
            raise ValueError(
                f"a packed forward takes input_ids [1, {self.total}] (the sequences' lengths summed), "
                f"got shape {tuple(input_ids.shape)}"
            )

    def block_mask(self):
        """FlexAttention's block mask of causal attention within each sequence, built once per packed row."""
        if self._block_mask is None:
            from torch.nn.attention.flex_attention import create_block_mask

            documents = self.document_ids()

            def same_sequence_causal(batch, head, query, key):
                return (documents[query] == documents[key]) & (query >= key)

            total = self.total
            self._block_mask = create_block_mask(
                same_sequence_causal, None, None, total, total, device=self.cu_seqlens.device
            )
        return self._block_mask


def compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """Autocast's dtype where it is on (flash-attn and FlexAttention are outside its reach), else the tensor's."""
    device_type = tensor.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else tensor.dtype


def default_backend(q: torch.Tensor) -> str:
    if q.device.type != "cuda":
        return "segments"
    if compute_dtype(q) in (torch.float16, torch.bfloat16) and _flash_varlen() is not None:
        return "flash_varlen"
    return "flex"


def packed_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packed: PackedSequences, groups: int,
    backend: str | None = None,
) -> torch.Tensor:
    """Causal attention within each packed sequence: q [1, heads, N, D], k, v [1, kv_heads, N, D] -> [1, heads, N, D].

    groups = heads / kv_heads (grouped-query attention); backend one of BACKENDS, None for the
    device's default.
    """
    backend = backend or default_backend(q)
    # Under autocast q and k leave their fp32 norms in fp32 while v is in autocast's dtype.
    dtype = compute_dtype(v)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    if backend == "segments":
        return _segments(q, k, v, packed, groups)
    if backend == "flash_varlen":
        return _flash_varlen_attention(q, k, v, packed)
    if backend == "flex":
        return _flex(q, k, v, packed, groups)
    raise ValueError(f"packed attention backend must be one of {BACKENDS}, got {backend!r}")


def _segments(q, k, v, packed: PackedSequences, groups: int) -> torch.Tensor:
    # split, not slicing: the backward of a slice writes into a zeroed copy of the whole row, once
    # per sequence (quadratic in the sequences per row); split's backward is one concatenation.
    outputs = [
        F.scaled_dot_product_attention(q_i, k_i, v_i, is_causal=True, enable_gqa=groups > 1)
        for q_i, k_i, v_i in zip(*(t.split(packed.lengths, dim=2) for t in (q, k, v)))
    ]
    return torch.cat(outputs, dim=2)


@functools.cache
def _flash_varlen():
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


def _flash_varlen_attention(q, k, v, packed: PackedSequences) -> torch.Tensor:
    function = _flash_varlen()
    if function is None:
        raise ValueError("the flash_varlen backend needs flash-attn (pip install flash-attn)")
    # flash-attn takes [N, heads, D] and handles grouped-query heads itself.
    out = function(
        q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1),
        packed.cu_seqlens, packed.cu_seqlens, packed.max_length, packed.max_length, causal=True,
    )
    return out.transpose(0, 1)[None]


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    # Uncompiled, FlexAttention materialises the N x N scores; compiled it is a fused kernel that
    # skips masked blocks. dynamic: packed rows change length every micro-batch.
    return torch.compile(flex_attention, dynamic=True)


def _flex(q, k, v, packed: PackedSequences, groups: int) -> torch.Tensor:
    if q.device.type == "cuda":
        flex = _compiled_flex()
    else:
        from torch.nn.attention.flex_attention import flex_attention as flex
    return flex(q, k, v, block_mask=packed.block_mask(), enable_gqa=groups > 1)
