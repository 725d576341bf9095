"""FSDP2 shards the vision tower part by part (model.vision.tower_parts), and a trained tower that runs once per
prompt inside one forward gets the gradients of the unsharded model (one gloo rank, in this process; the
two-rank run is tests/test_qwen3_vl_distributed.py)."""

from __future__ import annotations

import copy
import datetime

import pytest
import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule

from gspo_engine.distributed.parallel import parallelize
from gspo_engine.model import build_model
from gspo_engine.model.qwen3_vl import ImageInputs
from gspo_engine.model.vision import tower_parts
from gspo_engine.tiny import tiny_model_args


@pytest.fixture
def one_rank(tmp_path):
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=60))
    try:
        yield dist.device_mesh.init_device_mesh("cpu", (1,), mesh_dim_names=("dp",))
    finally:
        dist.destroy_process_group()


def loss_of(model, rows, visions):
    positions = torch.stack([v.sequence_position_ids(rows.shape[1]) for v in visions], dim=1)
    return model.forward_hidden(rows, position_ids=positions, visions=visions).hidden_states.square().mean()


def test_the_tower_is_sharded_part_by_part_and_trains_like_one_model(one_rank):
    args = tiny_model_args("tiny-vl")
    torch.manual_seed(0)
    plain = build_model(args)
    sharded = parallelize(copy.deepcopy(plain), one_rank, bf16_compute=False)
    assert all(isinstance(part, FSDPModule) for part in tower_parts(sharded.visual))
    vision = args.vision
    grid = torch.tensor([[1, 4, 4]])
    rows = torch.tensor([[0] + [vision.image_token_id] * 4 + [1, 2], [3] + [vision.image_token_id] * 4 + [2, 1]])
    images = [ImageInputs(torch.randn(16, vision.patch_dim), grid) for _ in range(2)]
    grads = []
    for model in (plain, sharded):
        # Two prompts: the tower runs twice in the forward, as a micro-batch of a trained tower runs it.
        visions = [model.prompt_vision(row, image) for row, image in zip(rows, images)]
        loss_of(model, rows, visions).backward()
        grads.append({name: p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
                      for name, p in model.visual.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grads[1][name], grad, atol=1e-6, rtol=1e-5)
