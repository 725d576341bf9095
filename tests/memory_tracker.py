"""Live tensor bytes and their peak, counted on any device (the CPU included), for checking the planner.

`torch.cuda.max_memory_allocated` exists only on a GPU, and torch's own tracker
(torch.distributed._tools.mem_tracker) is private. This one is a TorchDispatchMode: every op's
outputs that own a storage none of its inputs shares are new allocations; each is counted once,
and a weakref finalizer on the storage (torch keeps one Python object per storage alive as long
as the storage is) takes it off when the last tensor or view of it goes. What it counts is
tensor storage: allocator rounding, fragmentation and the scratch space kernels take internally
are not in it.

    with TensorMemoryTracker() as tracker:
        tracker.add_existing(model.parameters())   # what was alive before, if it should count
        ...
    print(tracker.peak_bytes)
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class TensorMemoryTracker(TorchDispatchMode):
    """live_bytes: storages counted and not yet freed; peak_bytes: the most live_bytes ever reached."""

    def __init__(self):
        super().__init__()
        self.live_bytes = 0
        self.peak_bytes = 0
        self._live: dict[int, int] = {}  # data_ptr of a counted storage -> its bytes

    def add_existing(self, tensors: Iterable[torch.Tensor | None]) -> None:
        """Count tensors allocated before the tracker started (weights, optimizer states), once each."""
        for tensor in tensors:
            if isinstance(tensor, torch.Tensor):
                self._count(tensor.untyped_storage())

    def reset_peak(self) -> None:
        """Start a new phase: the peak from here on, over what is alive now."""
        self.peak_bytes = self.live_bytes

    def _count(self, storage: torch.UntypedStorage) -> None:
        key, size = storage.data_ptr(), storage.nbytes()
        if size == 0 or key in self._live:
            return
        self._live[key] = size
        self.live_bytes += size
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        weakref.finalize(storage, self._release, key)

    def _release(self, key: int) -> None:
        self.live_bytes -= self._live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # An output sharing an input's storage is a view or an in-place result: nothing was allocated.
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.untyped_storage().data_ptr() not in inputs:
                self._count(tensor.untyped_storage())
        return out
