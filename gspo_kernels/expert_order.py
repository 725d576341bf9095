"""The order of the (token, slot) pairs by expert, which every MoE expert computation runs in.

N tokens routed to k experts each make N*k pairs, pair p = token * k + slot. Both backends
(gspo_kernels/moe.py, gspo_kernels/moe_triton.py) sort them stably by expert and describe the
result with an `ExpertOrder`; grouped matmuls then treat the rows of one expert as one block.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class ExpertOrder(NamedTuple):
    """(token, slot) pairs sorted stably by expert, with each expert's count and first sorted row."""

    sorted_pair: torch.Tensor  # [N*k] pair index at each sorted row; one expert's rows are in token order
    counts: torch.Tensor  # [E] rows per expert
    starts: torch.Tensor  # [E] first sorted row of each expert
    top_k: int
