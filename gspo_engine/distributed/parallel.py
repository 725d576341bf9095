"""FSDP2 applied to a single-device Qwen3Model from outside, the way torchtitan does it.

Each decoder block becomes one FSDP unit (its weights are all-gathered just before it runs and
freed after), as does each block and merger of an image-text model's vision tower, then the root
takes what is left: the embedding, the final norm and the lm_head.
The model code does not change: `forward_hidden` is registered as a forward method, so the
trainer's and the sampler's calls gather the root's weights like `forward` does. Experts that
expert parallelism has split over ranks (expert_sharding.shard_experts, run first) are left out:
FSDP2 neither gathers nor reduces them, so generation gathers every weight but those.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

from gspo_engine.distributed.expert_sharding import expert_parameters
from gspo_engine.distributed.runtime import Runtime
from gspo_engine.model import Qwen3Model
from gspo_engine.model.vision import tower_parts


def data_parallel_mesh(runtime: Runtime, device: torch.device) -> DeviceMesh:
    """A one-dimensional mesh over every rank: FSDP2 shards each weight across all of them."""
    return init_device_mesh(device.type, (runtime.world_size,), mesh_dim_names=("dp",))


def parallelize(model: Qwen3Model, mesh: DeviceMesh, *, bf16_compute: bool, reshard_after_forward: bool = True
                ) -> Qwen3Model:
    """Shard `model` over `mesh` in place (FSDP2 per block, then the root) and return it.

    bf16_compute: the weights are gathered in bf16 for compute and the gradients reduced in fp32,
    while the sharded master weights and AdamW states stay fp32 (MixedPrecisionPolicy).
    Gradients are summed over ranks, not averaged: each rank's loss is already divided by the
    number of sequences on all ranks, so the sum is the gradient of the whole batch's loss.
    """
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16_compute \
        else MixedPrecisionPolicy()
    experts = expert_parameters(model)
    visual = getattr(model, "visual", None)
    # An image-text model's vision tower is sharded like the text layers: block by block, each merger, then
    # the tower itself (its patch and position embeddings).
    for part in [] if visual is None else tower_parts(visual):
        fully_shard(part, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    for block in model.layers:
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward,
                    ignored_params={p for p in block.parameters() if p in experts} or None)
    # The root's weights are needed again right after the forward (the fused loss reads the
    # lm_head weight, the backward starts at the final norm): FSDP2 keeps them gathered.
    fully_shard(model, mesh=mesh, mp_policy=policy, ignored_params=experts or None)
    for unit in fsdp_units(model):
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)  # plain sums: gloo has no pre-scaled reduction
    register_fsdp_forward_method(model, "forward_hidden")
    if visual is not None:
        # A prompt's image features are also computed outside forward_hidden (prompt_vision, once per prompt and
        # step): through the root, so that it is initialised as the root before the tower's parts run.
        register_fsdp_forward_method(model, "prompt_vision")
    return model


def fsdp_units(model: torch.nn.Module) -> list[FSDPModule]:
    return [module for module in model.modules() if isinstance(module, FSDPModule)]


@contextmanager
def gathered_weights(model: torch.nn.Module, reshard_after_forward: bool = True):
    """Every weight gathered once, for the length of the block (generation).

    A decode step runs the whole model for one token; gathering every block at every step would
    move the whole model per token, and ranks whose rollouts end sooner would stop joining the
    gathers the others wait in. Gathered up front, the forwards issue no collective at all, so
    each rank decodes as many steps as its own prompts need.
    """
    units = fsdp_units(model)
    if not units:
        yield
        return
    for unit in units:
        unit.unshard()
    blocks = [unit for unit in units if unit is not model]
    for block in blocks:
        block.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for block in blocks:
            block.set_reshard_after_forward(reshard_after_forward, recurse=False)
        for unit in units:
            unit.reshard()
