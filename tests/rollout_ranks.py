"""Run by tests/test_decoding.py under torchrun (gloo): each rank generates its share of the prompts, rows
rank, rank + N, ..., under a KV cache budget of 3 sequences, and rank 0 writes every rank's completions. Also
run from tests/run_commands.py, in a process group that other runs of the launch share.

    torchrun --nproc_per_node 2 tests/rollout_ranks.py CHECKPOINT PROMPTS.json OUT.pt TEMPERATURE EOS
"""

import json
import sys

import torch
import torch.distributed as dist

from gspo_engine import generate, load_pretrained
from gspo_engine.model.kv_cache import slot_bytes


def main(checkpoint: str, prompts_file: str, out_file: str, temperature: float, eos: int) -> None:
    own_group = not dist.is_initialized()
    if own_group:
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    model = load_pretrained(checkpoint)
    prompts, max_new, seed = (lambda d: (d["prompts"], d["max_new_tokens"], d["seed"]))(
        json.loads(open(prompts_file).read()))
    rows = list(range(rank, len(prompts), world))
    mine = [prompts[row] for row in rows]
    capacity = max(len(p) for p in mine) + max_new - 1
    budget = 3.5 * slot_bytes(model.args, capacity, torch.float32) / 1e9
    out = generate(model, mine, max_new_tokens=max_new, temperature=temperature, seed=seed, sample_ids=rows,
                   eos_token_id=eos, kv_cache_gb=budget)
    assert out.slots == 3
    shares = [None] * world
    dist.all_gather_object(shares, {"rows": rows, "tokens": out.tokens, "logps": [l.tolist() for l in out.logps]})
    if rank == 0:
        torch.save(shares, out_file)
    if own_group:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]), int(sys.argv[5]))
