"""Which process this is: rank, world size and device, from torchrun's environment.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK (and the rendezvous address) for every process it
starts. A process started without them is a single-process run: world size 1, no process group,
and every collective below returns its input unchanged, so the trainer has one code path.
NCCL carries the collectives on GPUs, gloo on CPUs.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


class DistributedError(RuntimeError):
    """A collective failed: a rank died, hung past distributed.timeout_s, or the launch is wrong."""


@dataclass(frozen=True)
class Runtime:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    distributed: bool = False  # a process group exists (launched by torchrun, even with one rank)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, requested: torch.device) -> torch.device:
        """The rank's own GPU (cuda:LOCAL_RANK) when the run is on GPUs."""
        if requested.type == "cuda" and self.distributed:
            return torch.device("cuda", self.local_rank)
        return requested

    # ---------------------------------------------------------- collectives
    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks (fp64 on the host: counts and metrics, not tensors of the model)."""
        if not self.distributed:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=self._collective_device())
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.cpu().tolist()

    def max(self, values: list[float]) -> list[float]:
        if not self.distributed:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=self._collective_device())
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor.cpu().tolist()

    def gather(self, value):
        """Every rank's `value` (picklable), in rank order, on every rank."""
        if not self.distributed:
            return [value]
        out = [None] * self.world_size
        dist.all_gather_object(out, value)
        return out

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def _collective_device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if dist.get_backend() == "nccl" else torch.device("cpu")


def launched_by_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def init_runtime(device_type: str, timeout_s: float) -> Runtime:
    """Join torchrun's process group (once per process), or a single-process runtime without torchrun."""
    if not launched_by_torchrun():
        return Runtime()
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        try:
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
        except Exception as error:  # the rendezvous raises several types; all mean the same to a user
            raise DistributedError(
                f"rank {rank} of {world_size} could not join the process group "
                f"(MASTER_ADDR={os.environ.get('MASTER_ADDR')}, MASTER_PORT={os.environ.get('MASTER_PORT')}): {error}"
            ) from error
    return Runtime(rank, world_size, local_rank, distributed=True)

