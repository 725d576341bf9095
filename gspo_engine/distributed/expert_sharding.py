"""Expert parallelism on a model: which experts each rank holds, and how their layers reach the others'.

`distributed.expert_parallel: N` lays the W ranks out as a 2-D mesh ("dp", "ep") of W/N x N:
the N ranks of an "ep" row split every MoE layer's experts between them, rank i of the row
holding experts [i E/N, (i + 1) E/N); the W/N rows are replicas of each other. Expert tensors
(SparseMoE.gate_up [E, 2I, H] and down [E, H, I]) become DTensors on that mesh, placed
(Replicate() over "dp", Shard(0) over "ep"): a rank's local tensor is its block of E/N experts,
and the DTensor keeps the global shape, so distributed checkpoints, full state dicts and the
optimizer see the whole tensor under its usual name. AdamW keeps its states beside each
parameter: a rank holds the states of its own experts only. FSDP2 never touches these tensors
(parallel.parallelize leaves them out); it shards every other weight over all W ranks.

In a forward, each MoE layer routes its own tokens and sends them to their experts' ranks and
back (expert_parallel.expert_parallel_moe over the "ep" row's process group). The gradient of a
block of experts then holds the pairs of the whole row's tokens; the replicas' gradients are
summed over "dp" in the backward (in fp32, before the compute cast), so every replica takes the
same step.

Every rank of a row must run the MoE layers the same number of times: training and scoring pad
their micro-batch counts across ranks, and a rank whose generation ended calls `finish_in_step`,
which joins its peers' exchanges with no tokens until all of them have ended.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from gspo_engine.distributed.expert_parallel import ExchangeFlags, expert_parallel_moe
from gspo_engine.model.moe import SparseMoE

EXPERT_WEIGHTS = ("gate_up", "down")


class ExpertExchange:
    """Runs one SparseMoE's experts across its "ep" row: set as SparseMoE.expert_exchange.

    replicas: the "dp" group of the ranks that hold the same experts (None when there is one
    replica); the gradient of the local blocks is summed over it in the backward.
    """

    def __init__(self, group: dist.ProcessGroup, replicas: dist.ProcessGroup | None, flags: ExchangeFlags):
        self.group = group
        self.replicas = replicas
        self.flags = flags  # shared by every MoE layer of a model

    def __call__(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor, gate_up: torch.Tensor,
                 down: torch.Tensor) -> torch.Tensor:
        """SparseMoE's experts for this rank's tokens x; gate_up / down: the layer's expert parameters (DTensors),
        whose local blocks are cast to x's dtype here."""
        gate_up, down = self.local(gate_up, x.dtype), self.local(down, x.dtype)
        return expert_parallel_moe(x, topk_idx, topk_weight, gate_up, down, self.group, self.flags)

    def local(self, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        if self.replicas is not None and local.requires_grad:
            local = _SumOverReplicas.apply(local, self.replicas)  # the fp32 gradient summed over replicas
        return local.to(dtype)


class _SumOverReplicas(torch.autograd.Function):
    """Identity forward; the backward sums the gradient over the replicas (ranks holding the same experts).

    Part of the graph rather than a hook on the parameter, so it outlives the parameter's
    replacement (to_empty, state-dict loads) and runs once per backward, in the graph's order on
    every rank.
    """

    @staticmethod
    def forward(ctx, local: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return local.view_as(local)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def expert_mesh(world_size: int, expert_parallel: int, device: torch.device) -> DeviceMesh:
    """The ("dp", "ep") mesh of W/N replicas of N ranks; the ranks of one replica are consecutive."""
    return init_device_mesh(device.type, (world_size // expert_parallel, expert_parallel), mesh_dim_names=("dp", "ep"))


def moe_layers(model: nn.Module) -> list[SparseMoE]:
    return [module for module in model.modules() if isinstance(module, SparseMoE)]


def shard_experts(model: nn.Module, mesh: DeviceMesh) -> list[nn.Parameter]:
    """Keep only this rank's block of every MoE layer's experts (in place); the new expert parameters.

    Runs before FSDP2 (which must leave the returned parameters out) and works on a model on the
    meta device too: the blocks are then filled by broadcast_full_state_dict.
    """
    ep_mesh, dp_mesh = mesh["ep"], mesh["dp"]
    ep, ep_rank = ep_mesh.size(), ep_mesh.get_local_rank()
    flags = ExchangeFlags()
    replicas = dp_mesh.get_group() if dp_mesh.size() > 1 else None
    sharded: list[nn.Parameter] = []
    for layer in moe_layers(model):
        if layer.expert_lora is not None:
            raise ValueError("expert parallelism does not take LoRA adapters on the experts")
        for name in EXPERT_WEIGHTS:
            full = getattr(layer, name)
            block = full.detach().chunk(ep, dim=0)[ep_rank].clone()
            local = DTensor.from_local(block, mesh, [Replicate(), Shard(0)], run_check=False,
                                       shape=full.shape, stride=full.stride())
            param = nn.Parameter(local, requires_grad=full.requires_grad)
            setattr(layer, name, param)
            sharded.append(param)
        layer.expert_exchange = ExpertExchange(ep_mesh.get_group(), replicas, flags)
    return sharded


def expert_parameters(model: nn.Module) -> set[nn.Parameter]:
    """The expert tensors `shard_experts` split over ranks (empty for a model without expert parallelism)."""
    return {getattr(layer, name) for layer in moe_layers(model) if layer.expert_exchange is not None
            for name in EXPERT_WEIGHTS}


@torch.no_grad()
def finish_in_step(model: nn.Module) -> int:
    """After this rank's own generation: run the MoE layers on no tokens of its own, as a whole forward
    would, until every rank of its "ep" row has finished; the number of such forwards.

    The peers still generating send this rank tokens for its experts and wait for their outputs.
    The ranks decide to stop at the first MoE layer of a forward, from the flags that exchange
    carried, which every rank of the row receives alike: they all stop after the same forward.
    Call it under the generation's autocast, so the rows exchanged have the peers' dtype.
    """
    layers = [layer for layer in moe_layers(model) if layer.expert_exchange is not None]
    if not layers:
        return 0
    flags = layers[0].expert_exchange.flags
    weight = layers[0].router.weight
    empty = torch.zeros(1, 0, weight.shape[1], dtype=weight.dtype, device=weight.device)
    flags.busy = False
    forwards = 0
    try:
        while True:
            forwards += 1
            layers[0](empty)
            others_busy = flags.any_busy
            for layer in layers[1:]:
                layer(empty)
            if not others_busy:
                return forwards
    finally:
        flags.busy = True
