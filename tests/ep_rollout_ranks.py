"""Run by tests/test_expert_parallel_training.py under torchrun (gloo): the ranks split the experts of a MoE
checkpoint (distributed.expert_parallel = world size) and FSDP2 shards the rest, as the trainer does; each
rank generates an uneven share of the prompts (so the ranks finish after different numbers of forwards),
joins its peers' exchanges until they all finish, and rank 0 writes every rank's completions. Also run
from tests/run_commands.py, in a process group that other runs of the launch share.

    torchrun --nproc_per_node N tests/ep_rollout_ranks.py CHECKPOINT PROMPTS.json OUT.pt
"""

import json
import sys

import torch
import torch.distributed as dist

from gspo_engine import generate, load_pretrained
from gspo_engine.distributed.expert_sharding import expert_mesh, finish_in_step, shard_experts
from gspo_engine.distributed.parallel import data_parallel_mesh, gathered_weights, parallelize
from gspo_engine.distributed.runtime import Runtime


def main(checkpoint: str, prompts_file: str, out_file: str) -> None:
    own_group = not dist.is_initialized()
    if own_group:
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    spec = json.loads(open(prompts_file).read())
    model = load_pretrained(checkpoint)
    device = torch.device("cpu")
    shard_experts(model, expert_mesh(world, world, device))
    parallelize(model, data_parallel_mesh(Runtime(rank, world, 0, True), device), bf16_compute=False)
    rows = spec["rows"][rank]
    mine = [spec["prompts"][row] for row in rows]
    with torch.no_grad(), gathered_weights(model):
        out = generate(model, mine, max_new_tokens=spec["max_new_tokens"], temperature=spec["temperature"],
                       seed=spec["seed"], sample_ids=rows, eos_token_id=spec["eos"], kv_cache_gb=spec["kv_cache_gb"])
        idle_forwards = finish_in_step(model)
    shares = [None] * world
    dist.all_gather_object(shares, {"rows": rows, "tokens": out.tokens, "logps": [l.tolist() for l in out.logps],
                                    "forwards": out.decode_steps, "idle_forwards": idle_forwards})
    if rank == 0:
        torch.save(shares, out_file)
    if own_group:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3])
