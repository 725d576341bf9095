"""One rank's peak tensor bytes, phase by phase, in one GSPO step under FSDP2: run by
tests/test_plan_distributed.py under torchrun (gloo on the CPU).

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/plan_rank_peaks.py CASES.json OUT

CASES.json is a list of {"id": ..., "config": YAML path, "overrides": ["SECTION.KEY=VALUE", ...]};
each case builds a GSPOTrainer in every rank, runs one train_step under the tracker below and
writes OUT/ID-rankR.json: the peak live bytes of the rollout (from the whole-model gather to its
release), the scoring forward and the update, and within each phase the peak of the weights
FSDP2 holds gathered.

tests/memory_tracker.py's tracker alone misses two things under FSDP2, and this one adds them:
- FSDP2 keeps each gathered (unsharded) weight in a buffer of its own and frees and reallocates
  it with UntypedStorage.resize_ (0 bytes when resharded, the full size when gathered again),
  which no dispatched op does. Counted only by their first torch.empty, those buffers would stay
  counted after every reshard and never again at a later gather; here each resize_ takes the
  old bytes off and counts the new ones. The flat all-gather output FSDP2 copies them out of
  and the reduce-scatter input are ordinary torch.empty tensors, which the base tracker counts.
- Sharded weights, their gradients and AdamW's states are DTensors: wrappers whose own
  storage is empty. Their local shards are what is counted.
"""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
from memory_tracker import TensorMemoryTracker
from torch.distributed._functional_collectives import AsyncCollectiveTensor
from torch.distributed.tensor import DTensor
from torch.utils._pytree import tree_leaves

import gspo_engine.trainer as trainer_module
from gspo_engine.config import load_config


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor holding the storage: a DTensor's local shard, a functional collective's result (the
    expert-parallel exchange's all-to-alls return it wrapped until it is waited on)."""
    if isinstance(tensor, DTensor):
        return tensor._local_tensor
    return tensor.elem if isinstance(tensor, AsyncCollectiveTensor) else tensor


class ShardedTracker(TensorMemoryTracker):
    """TensorMemoryTracker that sees DTensors' local shards and FSDP2's resized weight buffers, and
    tells apart what FSDP2 holds for the weights it gathers.

    gathered_bytes / gathered_peak: the live bytes of FSDP2's all-gather buffers (the flat output
    of each all-gather and each weight's own buffer it is copied out into) and their peak since
    the last reset_peak; window_peak: their peak since the last start_window.
    reduce_scatter_peak: the most bytes of one unit's unsharded gradients plus the reduce-scatter
    input they are copied into, seen at the copy.
    """

    def __init__(self):
        super().__init__()
        self.gathered_bytes = 0
        self.gathered_peak = 0
        self.window_peak = 0
        self.reduce_scatter_peak = 0
        self._gathered: dict[int, int] = {}  # data_ptr -> bytes of a live all-gather buffer

    def add_existing(self, tensors) -> None:
        super().add_existing(_local(t) for t in tensors if isinstance(t, torch.Tensor))

    def reset_peak(self) -> None:
        super().reset_peak()
        self.gathered_peak = self.window_peak = self.gathered_bytes
        self.reduce_scatter_peak = 0

    def start_window(self) -> None:
        self.window_peak = self.gathered_bytes

    def _release(self, key: int) -> None:
        super()._release(key)
        self.gathered_bytes -= self._gathered.pop(key, 0)

    def _gathered_buffer(self, storage: torch.UntypedStorage) -> None:
        key = storage.data_ptr()
        if key in self._live and key not in self._gathered:
            self._gathered[key] = storage.nbytes()
            self.gathered_bytes += storage.nbytes()
            self.gathered_peak = max(self.gathered_peak, self.gathered_bytes)
            self.window_peak = max(self.window_peak, self.gathered_bytes)

    @contextmanager
    def resizes_counted(self):
        """Count storages as UntypedStorage.resize_ frees and reallocates them (FSDP2's gathered weights)."""
        original = torch.UntypedStorage.resize_
        tracker = self

        def resize_(storage, size):
            tracker._release(storage.data_ptr())
            out = original(storage, size)
            if storage.nbytes():
                tracker._count(storage)
                tracker._gathered_buffer(storage)
            return out

        torch.UntypedStorage.resize_ = resize_
        try:
            yield
        finally:
            torch.UntypedStorage.resize_ = original

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {_local(t).untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                storage = _local(tensor).untyped_storage()
                if storage.data_ptr() not in inputs:
                    self._count(storage)
        if func is torch.ops.fsdp.all_gather_copy_in.default:  # (input shard view, flat all-gather output)
            self._gathered_buffer(out[1].untyped_storage())
        elif func is torch.ops.fsdp.split_with_sizes_copy.default:  # the flat output into each weight's buffer
            for tensor in kwargs["out"]:
                self._gathered_buffer(tensor.untyped_storage())
        elif func is torch.ops.fsdp.chunk_cat.default:  # one unit's gradients into the reduce-scatter input
            storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                        for t in [*args[0], kwargs["out"]]}
            self.reduce_scatter_peak = max(self.reduce_scatter_peak, sum(storages.values()))
        return out


def measure(config) -> dict:
    """Peak live bytes per phase of one step on this rank, AdamW states present (as tests/test_plan.py)."""
    trainer = trainer_module.GSPOTrainer(config, echo=lambda *args: None)
    trainer.eos_ids = []  # every completion runs to max_new_tokens, the length the planner plans for
    for param in trainer.model.parameters():  # AdamW's states, from a step that moves nothing
        param.grad = torch.zeros_like(param)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    tracker = ShardedTracker()
    peaks: dict[str, dict[str, int]] = {}

    def record(name: str, **extra) -> None:
        peaks[name] = dict(peak=tracker.peak_bytes, gathered=tracker.gathered_peak,
                           reduce_scatter=tracker.reduce_scatter_peak, **extra)

    def phase(name, function):
        def run(*args, **kwargs):
            tracker.reset_peak()
            out = function(*args, **kwargs)
            record(name)
            return out
        return run

    gathered_weights = trainer_module.gathered_weights

    @contextmanager
    def rollout_phase(*args, **kwargs):
        # The rollout is the whole gather for generation: from before it to after generate returns.
        tracker.reset_peak()
        before = tracker.live_bytes
        with gathered_weights(*args, **kwargs):
            gathered = tracker.live_bytes - before  # what gathering every weight added
            yield
        record("rollout", gather_added=gathered)

    backward_gathered = [0]
    tensor_backward = torch.Tensor.backward

    def backward(tensor, *args, **kwargs):
        # The weights gathered during the update's backwards alone (its forwards hold more).
        tracker.start_window()
        tensor_backward(tensor, *args, **kwargs)
        backward_gathered[0] = max(backward_gathered[0], tracker.window_peak)

    trainer_module.gathered_weights = rollout_phase
    torch.Tensor.backward = backward
    score_samples = trainer_module.score_samples
    trainer_module.score_samples = phase("scoring", score_samples)
    trainer.updater.run = phase("training", trainer.updater.run)
    states = [t for state in trainer.optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
    try:
        with tracker, tracker.resizes_counted():
            tracker.add_existing(list(trainer.model.parameters()) + states)
            trainer.train_step()
    finally:
        trainer_module.gathered_weights = gathered_weights
        trainer_module.score_samples = score_samples
        torch.Tensor.backward = tensor_backward
    peaks["training"]["gathered_backward"] = backward_gathered[0]
    return peaks


def main(cases_path: str, out: str) -> None:
    torch.set_num_threads(1)
    out_dir = Path(out)
    for case in json.loads(Path(cases_path).read_text()):
        config = load_config(case["config"], case["overrides"])
        peaks = measure(config)
        rank = torch.distributed.get_rank()
        (out_dir / f"{case['id']}-rank{rank}.json").write_text(json.dumps(peaks))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
