"""Expert-parallel token exchange on 2 and 4 gloo processes against the single-process grouped experts.

Every worker builds the same global case from a seed (all ranks' tokens, routing, upstream
gradients and the full expert weights), runs its own tokens through `expert_parallel_moe` with
its block of experts only, and saves its output, gradients and exchange counts; the parent
compares them with `gk.moe_experts` on all tokens and all experts in float64.
"""

import datetime
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import gspo_kernels as gk
from gspo_engine.distributed.expert_parallel import (
    exchange_counts,
    expert_parallel_moe,
    plan_dispatch,
    received_local_experts,
)

EXPERTS, HIDDEN, INTERMEDIATE = 8, 16, 8
JOIN_TIMEOUT_S = 120
# Relative weight of each expert in the routing: one expert takes most pairs, some get none.
SKEWED = [12.0, 3.0, 1.0, 1.0, 0.5, 0.5, 0.0, 0.0]  # with ep = 4, rank 3 (experts 6, 7) receives nothing
HIGH_ONLY = [0.0, 0.0, 0.0, 0.0, 1.0, 8.0, 1.0, 0.5]  # with ep = 2, rank 0 (experts 0-3) receives nothing
UNIFORM = [1.0] * EXPERTS

# (tokens per rank, top_k, expert weights in the routing, the ranks that receive no row)
CASES = {
    2: [([37, 0], 2, SKEWED, []), ([1, 20], 2, HIGH_ONLY, [0])],
    4: [([23, 1, 0, 40], 2, SKEWED, [3]), ([5, 17, 9, 12], 3, UNIFORM, [])],
}


def make_case(tokens, top_k, expert_weights, seed):
    """Global inputs of one case: per-rank lists of x, topk_idx, topk_weight, upstream grad; full experts."""
    gen = torch.Generator().manual_seed(seed)
    probs = torch.tensor(expert_weights)
    case = {"x": [], "topk_idx": [], "topk_weight": [], "grad_y": []}
    for n in tokens:
        case["x"].append(torch.randn(n, HIDDEN, generator=gen))
        idx = torch.multinomial(probs.expand(n, EXPERTS), top_k, generator=gen) if n else torch.empty(0, top_k)
        case["topk_idx"].append(idx.to(torch.int64))
        weight = torch.rand(n, top_k, generator=gen) + 0.1
        case["topk_weight"].append(weight / weight.sum(dim=1, keepdim=True))
        case["grad_y"].append(torch.randn(n, HIDDEN, generator=gen))
    case["gate_up"] = 0.3 * torch.randn(EXPERTS, 2 * INTERMEDIATE, HIDDEN, generator=gen)
    case["down"] = 0.3 * torch.randn(EXPERTS, HIDDEN, INTERMEDIATE, generator=gen)
    return case


def worker(rank, ep, tmp_dir):
    torch.set_num_threads(1)
    store = dist.FileStore(f"{tmp_dir}/store", ep)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=ep, timeout=datetime.timedelta(seconds=60))
    try:
        local = slice(rank * EXPERTS // ep, (rank + 1) * EXPERTS // ep)
        for index, (tokens, top_k, expert_weights, _) in enumerate(CASES[ep]):
            case = make_case(tokens, top_k, expert_weights, seed=index)
            x = case["x"][rank].clone().requires_grad_()
            topk_weight = case["topk_weight"][rank].clone().requires_grad_()
            gate_up = case["gate_up"][local].clone().requires_grad_()
            down = case["down"][local].clone().requires_grad_()
            topk_idx = case["topk_idx"][rank]
            plan = plan_dispatch(topk_idx, EXPERTS, ep)
            recv_counts = exchange_counts(plan.send_counts)
            y = expert_parallel_moe(x, topk_idx, topk_weight, gate_up, down)
            (y * case["grad_y"][rank]).sum().backward()
            result = {"y": y.detach(), "send_counts": plan.send_counts, "recv_counts": recv_counts}
            result.update(x=x.grad, topk_weight=topk_weight.grad, gate_up=gate_up.grad, down=down.grad)
            torch.save(result, f"{tmp_dir}/case{index}_rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_workers(ep, tmp_path):
    context = mp.spawn(worker, args=(ep, str(tmp_path)), nprocs=ep, join=False)
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    while not context.join(timeout=1):  # raises with the worker's traceback when one fails
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {ep} expert-parallel workers did not finish in {JOIN_TIMEOUT_S} s")


def single_process_reference(case):
    """Output and gradients of gk.moe_experts on all ranks' tokens and all experts, float64."""
    x = torch.cat(case["x"]).double().requires_grad_()
    topk_weight = torch.cat(case["topk_weight"]).double().requires_grad_()
    gate_up = case["gate_up"].double().requires_grad_()
    down = case["down"].double().requires_grad_()
    y = gk.moe_experts(x, torch.cat(case["topk_idx"]), topk_weight, gate_up, down)
    (y * torch.cat(case["grad_y"]).double()).sum().backward()
    return {"y": y.detach(), "x": x.grad, "topk_weight": topk_weight.grad, "gate_up": gate_up.grad, "down": down.grad}


def close(actual, expected):
    torch.testing.assert_close(actual, expected.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # torchrun with 2 and 4 gloo ranks: 7 and 15 s
@pytest.mark.parametrize("ep", sorted(CASES))
def test_expert_parallel_matches_single_process(ep, tmp_path):
    run_workers(ep, tmp_path)
    per_rank = EXPERTS // ep
    for index, (tokens, top_k, expert_weights, idle_ranks) in enumerate(CASES[ep]):
        case = make_case(tokens, top_k, expert_weights, seed=index)
        ref = single_process_reference(case)
        results = [torch.load(tmp_path / f"case{index}_rank{rank}.pt") for rank in range(ep)]
        bounds = torch.tensor([0, *tokens]).cumsum(0).tolist()
        all_counts = torch.bincount(torch.cat(case["topk_idx"]).reshape(-1), minlength=EXPERTS)
        for rank, result in enumerate(results):
            mine = slice(bounds[rank], bounds[rank + 1])
            local = slice(rank * per_rank, (rank + 1) * per_rank)
            for name in ("y", "x", "topk_weight"):
                close(result[name], ref[name][mine])
            # The local slice's gradient sums the pairs of every rank's tokens.
            close(result["gate_up"], ref["gate_up"][local])
            close(result["down"], ref["down"][local])

            own_counts = torch.bincount(case["topk_idx"][rank].reshape(-1), minlength=EXPERTS)
            assert torch.equal(result["send_counts"], own_counts.view(ep, per_rank))
            from_sources = torch.stack([other["send_counts"][rank] for other in results])
            assert torch.equal(result["recv_counts"], from_sources)
            assert torch.equal(result["recv_counts"].sum(dim=0), all_counts[local])
        received = [int(result["recv_counts"].sum()) for result in results]
        assert [rank for rank, rows in enumerate(received) if rows == 0] == idle_ranks


def test_plan_groups_pairs_by_destination_rank():
    topk_idx = torch.tensor([[7, 0], [2, 5], [0, 3], [6, 1], [0, 4]])
    plan = plan_dispatch(topk_idx, num_experts=8, ep=4)
    sorted_experts = topk_idx.reshape(-1)[plan.sorted_pair]
    assert sorted_experts.tolist() == [0, 0, 0, 1, 2, 3, 4, 5, 6, 7]
    assert plan.sorted_pair.tolist()[:3] == [1, 4, 8]  # stable: one expert's pairs stay in token order
    assert plan.send_counts.tolist() == [[3, 1], [1, 1], [1, 1], [1, 1]]
    assert plan.send_splits == [4, 2, 2, 2]
    assert received_local_experts(torch.tensor([[2, 0], [1, 3]])).tolist() == [0, 0, 0, 1, 1, 1]


def test_plan_of_no_tokens():
    plan = plan_dispatch(torch.empty(0, 2, dtype=torch.int64), num_experts=8, ep=2)
    assert plan.sorted_pair.numel() == 0
    assert plan.send_splits == [0, 0]
    assert received_local_experts(torch.zeros(2, 4, dtype=torch.int64)).numel() == 0


def test_plan_rejects_bad_inputs():
    topk_idx = torch.tensor([[0, 1]])
    with pytest.raises(ValueError, match="num_experts = 6 is not divisible by ep = 4"):
        plan_dispatch(topk_idx, num_experts=6, ep=4)
    with pytest.raises(ValueError, match="ep must be a positive int"):
        plan_dispatch(topk_idx, num_experts=8, ep=0)
    with pytest.raises(ValueError, match=r"topk_idx must lie in \[0, E = 8\)"):
        plan_dispatch(torch.tensor([[0, 8]]), num_experts=8, ep=2)
    with pytest.raises(ValueError, match="integer"):
        plan_dispatch(torch.tensor([[0.0, 1.0]]), num_experts=8, ep=2)
