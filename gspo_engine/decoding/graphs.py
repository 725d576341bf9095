"""Decode steps run eagerly or, on CUDA, replayed as CUDA graphs (one per bucket of rows x columns).

A decode step (decoding/slots.decode_step) has shapes fixed by how many slots it runs and how many
cache columns it attends to. On CUDA those two are rounded up to powers of two, and each pair gets
one graph, captured the first time it is needed: that step runs eagerly first (on a side stream,
which also tunes the Triton kernels and fills autocast's cache of cast weights), then the step is
captured, and every later step of that size replays it. A step reads and writes only tensors that
live as long as the rollout, so no graph keeps an output of its own and all of them share one
memory pool. Elsewhere the same step runs eagerly at the exact sizes.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

from gspo_engine.model import Qwen3Model
from gspo_engine.model.moe import SparseMoE

logger = logging.getLogger(__name__)

# The fewest columns a captured step attends to: smaller buckets would only add captures.
SMALLEST_COLUMN_BUCKET = 64


def graph_blocker(model: Qwen3Model, device: torch.device) -> str | None:
    """Why decode steps of `model` cannot be captured as CUDA graphs on `device`, or None when they can."""
    if device.type != "cuda":
        return f"CUDA graphs need a CUDA device, the model is on {device.type}"
    scaling = model.args.rope_scaling
    if scaling is not None and scaling.rope_type == "dynamic":
        return "dynamic RoPE scaling reads the largest position back to the host every step"
    if scaling is not None and scaling.rope_type == "yarn":
        return "YaRN's frequencies are built on the host and copied to the device every step"
    if any(isinstance(m, SparseMoE) and m.expert_lora is not None for m in model.modules()):
        return "LoRA adapters on the experts read the per-expert counts back to the host"
    if any(getattr(m, "expert_exchange", None) is not None for m in model.modules()):
        return "expert parallelism exchanges tokens between ranks in collectives sized on the host"
    from torch.distributed.fsdp import FSDPModule

    if any(isinstance(m, FSDPModule) for m in model.modules()):
        return "FSDP2 modules run hooks around every forward"
    return None


def bucket(size: int, limit: int, smallest: int = 1) -> int:
    """The power of two at least `size` (and `smallest`), at most `limit`."""
    rounded = max(smallest, 1 << max(0, size - 1).bit_length())
    return min(rounded, limit)


def graph_sizes(rows: int, columns: int, slots: int, capacity: int) -> tuple[int, int]:
    """The (rows, columns) a captured step runs for `rows` slots attending to `columns` columns."""
    return bucket(rows, slots), bucket(columns, capacity, min(SMALLEST_COLUMN_BUCKET, capacity))


class DecodeRunner:
    """Calls step(rows, columns), eagerly or as replayed CUDA graphs; `sizes` says which sizes it runs."""

    def __init__(self, step: Callable[[int, int], None], slots: int, capacity: int, use_graphs: bool,
                 required: bool = False):
        """required: a capture that fails raises; otherwise the rollout goes on eagerly, with a warning."""
        self.step, self.slots, self.capacity, self.use_graphs = step, slots, capacity, use_graphs
        self.required = required
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.pool = torch.cuda.graph_pool_handle() if use_graphs else None

    def sizes(self, rows: int, columns: int) -> tuple[int, int]:
        """The (rows, columns) a step for `rows` slots attending to `columns` columns runs at."""
        if not self.use_graphs:
            return rows, columns
        return graph_sizes(rows, columns, self.slots, self.capacity)

    def __call__(self, rows: int, columns: int) -> None:
        rows, columns = self.sizes(rows, columns)
        if not self.use_graphs:
            self.step(rows, columns)
            return
        graph = self.graphs.get((rows, columns))
        if graph is not None:
            graph.replay()
            return
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.step(rows, columns)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                self.step(rows, columns)
        except RuntimeError as error:
            if self.required:
                raise
            # This step has run (the warm-up above): the rest of the rollout decodes eagerly.
            logger.warning("decode steps run eagerly: capturing one as a CUDA graph failed: %s", error)
            self.use_graphs = False
            return
        self.graphs[(rows, columns)] = graph

    @property
    def captured(self) -> int:
        return len(self.graphs)
