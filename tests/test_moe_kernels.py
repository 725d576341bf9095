"""moe_route and moe_experts against a float64 per-expert loop and transformers' Qwen3-MoE, on every backend."""

import math

import pytest
import torch
from transformers import Qwen3MoeConfig
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts, Qwen3MoeTopKRouter

import gspo_kernels as gk
from gspo_kernels import reference

BACKENDS = ["triton", "torch"]
CUDA = torch.cuda.is_available()
# Without a GPU the Triton kernels run in the interpreter, where bf16 tl.dot is wrong: fp32 there.
TRITON_DEVICE = "cuda" if CUDA else "cpu"
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 2e-2}

# (tokens N, hidden H, intermediate I, experts E, top_k k)
EXPERT_CASES = [
    (37, 40, 48, 6, 2),  # N not a multiple of any tile
    (1, 32, 32, 4, 1),  # a single token, k = 1
    (13, 37, 21, 5, 3),  # odd H and I: every dimension padded
    (6, 32, 32, 128, 8),  # E = 128, k = 8: most experts get no token
    (50, 64, 96, 4, 3),  # several row tiles per expert, several column tiles
]


def device_of(backend):
    return TRITON_DEVICE if backend == "triton" else "cpu"


def dtype_of(backend):
    # float64 always runs the PyTorch path: the Triton kernels are checked in fp32 (and bf16 on a GPU).
    return torch.float32 if backend == "triton" else torch.float64


def make_experts(seed, tokens, hidden, inter, experts, top_k):
    """float64 inputs routed by the reference router; the last expert is left without tokens when k < E."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, experts, generator=gen, dtype=torch.float64) * 2
    if top_k < experts:
        logits[:, -1] = -50.0
    weights, idx = reference.moe_route_reference(logits, top_k)
    return dict(
        x=torch.randn(tokens, hidden, generator=gen, dtype=torch.float64),
        topk_idx=idx,
        topk_weights=weights,
        w_gate_up=torch.randn(experts, 2 * inter, hidden, generator=gen, dtype=torch.float64) / math.sqrt(hidden),
        w_down=torch.randn(experts, hidden, inter, generator=gen, dtype=torch.float64) / math.sqrt(inter),
        grad_y=torch.randn(tokens, hidden, generator=gen, dtype=torch.float64),
    )


DIFFERENTIABLE = ("x", "topk_weights", "w_gate_up", "w_down")


def run_experts(inputs, backend, dtype=None, device=None):
    """y and the gradients of the four differentiable inputs, through gk.moe_experts on `backend`."""
    dtype = dtype or dtype_of(backend)
    device = device or device_of(backend)
    leaves = {name: inputs[name].to(device, dtype).requires_grad_() for name in DIFFERENTIABLE}
    with gk.use_backend(backend):
        y = gk.moe_experts(
            leaves["x"], inputs["topk_idx"].to(device), leaves["topk_weights"], leaves["w_gate_up"], leaves["w_down"]
        )
    y.backward(inputs["grad_y"].to(device, dtype))
    return y, {name: leaf.grad for name, leaf in leaves.items()}


def reference_experts(inputs):
    leaves = {name: inputs[name].clone().requires_grad_() for name in DIFFERENTIABLE}
    y = reference.moe_experts_reference(
        leaves["x"], inputs["topk_idx"], leaves["topk_weights"], leaves["w_gate_up"], leaves["w_down"]
    )
    y.backward(inputs["grad_y"])
    return y.detach(), {name: leaf.grad for name, leaf in leaves.items()}


def relative_error(value, expected):
    value = value.detach().cpu().to(torch.float64)
    expected = expected.detach()
    assert torch.isfinite(value).all()
    return float((value - expected).norm() / expected.norm().clamp(min=1e-300))


def assert_close(value, expected, dtype, what):
    err = relative_error(value, expected)
    assert err < TOLERANCE[dtype], f"{what}: relative error {err:.2e}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", EXPERT_CASES, ids=lambda case: "N{}-H{}-I{}-E{}-k{}".format(*case))
def test_experts_match_float64_reference(backend, case):
    inputs = make_experts(EXPERT_CASES.index(case), *case)
    expected_y, expected_grads = reference_experts(inputs)
    y, grads = run_experts(inputs, backend)
    dtype = dtype_of(backend)
    assert y.dtype == dtype and y.shape == expected_y.shape
    assert_close(y, expected_y, dtype, "y")
    for name in DIFFERENTIABLE:
        assert grads[name].dtype == dtype and grads[name].shape == inputs[name].shape
        assert_close(grads[name], expected_grads[name], dtype, f"d {name}")
    unused = torch.ones(case[3], dtype=torch.bool)
    unused[inputs["topk_idx"].flatten()] = False
    assert unused.any() == (case[4] < case[3])
    # Experts that receive no token get exactly zero gradient, not merely a small one.
    assert torch.count_nonzero(grads["w_gate_up"].cpu()[unused]) == 0
    assert torch.count_nonzero(grads["w_down"].cpu()[unused]) == 0


def transformers_experts(inputs, implementation):
    tokens, hidden = inputs["x"].shape
    experts, two_inter, _ = inputs["w_gate_up"].shape
    config = Qwen3MoeConfig(
        hidden_size=hidden, moe_intermediate_size=two_inter // 2, num_experts=experts,
        num_experts_per_tok=inputs["topk_idx"].shape[1], hidden_act="silu",
    )
    config._experts_implementation = implementation
    module = Qwen3MoeExperts(config).to(torch.float32)
    with torch.no_grad():
        module.gate_up_proj.copy_(inputs["w_gate_up"])
        module.down_proj.copy_(inputs["w_down"])
    x = inputs["x"].float().requires_grad_()
    weights = inputs["topk_weights"].float().requires_grad_()
    y = module(x, inputs["topk_idx"], weights)
    y.backward(inputs["grad_y"].float())
    grads = dict(x=x.grad, topk_weights=weights.grad, w_gate_up=module.gate_up_proj.grad, w_down=module.down_proj.grad)
    return y.detach(), grads


@pytest.mark.parametrize("backend", BACKENDS)
def test_experts_match_transformers_eager_qwen3_moe(backend):
    inputs = make_experts(11, 29, 48, 40, 8, 2)
    expected_y, expected_grads = transformers_experts(inputs, "eager")
    y, grads = run_experts(inputs, backend, dtype=torch.float32)
    # transformers computes in fp32 too: both are compared to each other at fp32 accuracy.
    assert relative_error(y, expected_y.double()) < 1e-5
    for name in DIFFERENTIABLE:
        assert relative_error(grads[name], expected_grads[name].double()) < 1e-5, name


def test_experts_handle_repeated_experts_and_strided_inputs():
    """Forced routings may repeat an expert within a token; x may be a strided view."""
    inputs = make_experts(5, 19, 40, 24, 5, 3)
    inputs["topk_idx"][::3, 1] = inputs["topk_idx"][::3, 0]
    expected_y, expected_grads = reference_experts(inputs)
    wide = torch.randn(19, 3 * 40, dtype=torch.float32, device=TRITON_DEVICE)
    x = wide[:, 40:80]
    x.copy_(inputs["x"])
    x.requires_grad_()
    w = inputs["topk_weights"].float().to(TRITON_DEVICE).requires_grad_()
    with gk.use_backend("triton"):
        idx = inputs["topk_idx"].to(TRITON_DEVICE, torch.int32)
        y = gk.moe_experts(x, idx, w, inputs["w_gate_up"].float().to(TRITON_DEVICE),
                           inputs["w_down"].float().to(TRITON_DEVICE))
    y.backward(inputs["grad_y"].float().to(TRITON_DEVICE))
    assert_close(y.cpu(), expected_y, torch.float32, "y")
    assert_close(x.grad.cpu(), expected_grads["x"], torch.float32, "dx")
    assert_close(w.grad.cpu(), expected_grads["topk_weights"], torch.float32, "d topk_weights")


def test_triton_writes_every_output_element(monkeypatch):
    from gspo_kernels import moe_triton

    def poisoned(*shape, dtype, device):
        size = tuple(shape[0]) if len(shape) == 1 and not isinstance(shape[0], int) else shape
        filler = float("nan") if dtype.is_floating_point else -(2**31)
        return torch.full(size, filler, dtype=dtype, device=device)

    monkeypatch.setattr(moe_triton, "allocate_output", poisoned)
    inputs = make_experts(3, 21, 36, 40, 7, 3)
    expected_y, expected_grads = reference_experts(inputs)
    y, grads = run_experts(inputs, "triton")
    assert_close(y, expected_y, dtype_of("triton"), "y")
    for name in DIFFERENTIABLE:
        assert_close(grads[name], expected_grads[name], dtype_of("triton"), f"d {name}")
    weights, idx = moe_triton.route_topk(torch.randn(9, 7, device=TRITON_DEVICE), 3, True, None)
    assert torch.isfinite(weights).all() and (idx >= 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_experts_are_bitwise_reproducible(backend):
    inputs = make_experts(7, 23, 32, 40, 6, 2)
    first_y, first = run_experts(inputs, backend)
    second_y, second = run_experts(inputs, backend)
    assert torch.equal(first_y, second_y)
    for name in DIFFERENTIABLE:
        assert torch.equal(first[name], second[name]), name


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_without_autograd_matches(backend):
    inputs = make_experts(8, 17, 32, 48, 5, 2)
    y, _ = run_experts(inputs, backend)
    device, dtype = device_of(backend), dtype_of(backend)
    args = [inputs[name].to(device, dtype) for name in ("x", "topk_idx", "topk_weights", "w_gate_up", "w_down")]
    args[1] = inputs["topk_idx"].to(device)
    with torch.no_grad(), gk.use_backend(backend):
        y_no_grad = gk.moe_experts(*args)
    assert torch.equal(y.detach(), y_no_grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    inputs = make_experts(9, 0, 16, 16, 4, 2)
    y, grads = run_experts(inputs, backend)
    assert y.shape == (0, 16)
    assert torch.count_nonzero(grads["w_gate_up"]) == 0 and torch.count_nonzero(grads["w_down"]) == 0


def test_cpu_path_in_bfloat16():
    inputs = make_experts(4, 33, 64, 32, 8, 2)
    expected_y, expected_grads = reference_experts(inputs)
    y, grads = run_experts(inputs, "torch", dtype=torch.bfloat16)
    assert y.dtype == torch.bfloat16
    assert_close(y, expected_y, torch.bfloat16, "y")
    for name in DIFFERENTIABLE:
        assert_close(grads[name], expected_grads[name], torch.bfloat16, f"d {name}")


@pytest.mark.skipif(not CUDA, reason="bf16 tl.dot needs a GPU (the interpreter computes it wrongly)")
@pytest.mark.parametrize("case", [(1000, 256, 128, 16, 4), (8, 512, 256, 128, 8), (3000, 128, 96, 64, 8)])
def test_triton_bfloat16_on_gpu(case):
    inputs = make_experts(21, *case)
    expected_y, expected_grads = reference_experts(inputs)
    y, grads = run_experts(inputs, "triton", dtype=torch.bfloat16)
    assert_close(y, expected_y, torch.bfloat16, "y")
    for name in DIFFERENTIABLE:
        assert_close(grads[name], expected_grads[name], torch.bfloat16, f"d {name}")


def test_triton_permutation_is_the_stable_sort_by_expert():
    from gspo_kernels import moe, moe_triton

    gen = torch.Generator().manual_seed(6)
    topk_idx = torch.randint(0, 37, (125, 8), generator=gen)  # 1000 pairs: several counting blocks
    topk_idx[topk_idx == 5] = 6  # an expert without pairs
    expected = moe.sort_by_expert(topk_idx, 37)
    order = moe_triton.sort_by_expert(topk_idx.to(TRITON_DEVICE), 37)
    assert torch.equal(order.sorted_pair.cpu().long(), expected.sorted_pair)
    assert torch.equal(order.counts.cpu().long(), expected.counts)
    assert torch.equal(order.starts.cpu().long(), expected.starts)


@pytest.mark.parametrize("block_m", [16, 32, 64, 128])
def test_tile_table_covers_every_expert_row_once(block_m):
    from gspo_kernels import moe, moe_triton

    gen = torch.Generator().manual_seed(block_m)
    counts = torch.randint(0, 300, (19,), generator=gen)
    counts[[0, 7, 18]] = 0
    counts[3] = block_m  # exactly one full tile
    topk_idx = torch.repeat_interleave(torch.arange(19), counts)[torch.randperm(int(counts.sum()), generator=gen)]
    order = moe.sort_by_expert(topk_idx[:, None], 19)
    on_device = type(order)(*(t.to(TRITON_DEVICE) if torch.is_tensor(t) else t for t in order))
    expert, first, end = moe_triton.tile_table(on_device, block_m).long().cpu()
    covered = torch.zeros(int(counts.sum()), dtype=torch.long)
    for e, start, stop in zip(expert.tolist(), first.tolist(), end.tolist(), strict=True):
        rows = torch.arange(start, max(start, min(start + block_m, stop)))  # tiles past the last one: empty
        assert (topk_idx[order.sorted_pair[rows]] == e).all()  # a tile never straddles two experts
        covered[rows] += 1
    assert (covered == 1).all()
    assert moe_triton.block_rows(16 * 128, 128) == 16 and moe_triton.block_rows(4096 * 8, 128) == 128


# ---------------------------------------------------------------------------------------------
# Routing


def route(backend, logits, top_k, **kwargs):
    logits = logits.detach().to(device_of(backend), dtype_of(backend)).requires_grad_()
    with gk.use_backend(backend):
        weights, idx = gk.moe_route(logits, top_k, **kwargs)
    return logits, weights, idx


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm_topk_prob", [True, False])
@pytest.mark.parametrize("experts, top_k", [(6, 2), (128, 8), (5, 5), (7, 1)])
def test_route_matches_reference(backend, norm_topk_prob, experts, top_k):
    gen = torch.Generator().manual_seed(experts * 10 + top_k)
    logits = torch.randn(37, experts, generator=gen, dtype=torch.float64) * 3
    grad = torch.randn(37, top_k, generator=gen, dtype=torch.float64)
    expected_leaf = logits.clone().requires_grad_()
    expected_weights, expected_idx = reference.moe_route_reference(expected_leaf, top_k, norm_topk_prob=norm_topk_prob)
    (expected_weights * grad).sum().backward()
    leaf, weights, idx = route(backend, logits, top_k, norm_topk_prob=norm_topk_prob)
    (weights * grad.to(weights)).sum().backward()
    assert idx.dtype == torch.int64 and weights.dtype == torch.promote_types(leaf.dtype, torch.float32)
    assert torch.equal(idx.cpu(), expected_idx)
    dtype = dtype_of(backend)
    assert_close(weights, expected_weights, dtype, "weights")
    if norm_topk_prob and top_k == 1:
        assert leaf.grad.abs().max() < 1e-6  # a single renormalised weight is the constant 1
    else:
        assert_close(leaf.grad, expected_leaf.grad, dtype, "d router_logits")


@pytest.mark.parametrize("backend", BACKENDS)
def test_route_matches_transformers_router(backend):
    config = Qwen3MoeConfig(hidden_size=24, num_experts=16, num_experts_per_tok=4, norm_topk_prob=True)
    router = Qwen3MoeTopKRouter(config)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        router.weight.copy_(torch.randn(16, 24, generator=gen))
    hidden = torch.randn(41, 24, generator=gen)
    logits, expected_weights, expected_idx = router(hidden)
    with gk.use_backend(backend):
        weights, idx = gk.moe_route(logits.detach().to(device_of(backend)), 4)
    assert torch.equal(idx.cpu(), expected_idx)
    assert relative_error(weights, expected_weights.double()) < 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_route_ties_go_to_the_lower_expert(backend):
    gen = torch.Generator().manual_seed(3)
    logits = torch.randint(0, 3, (40, 9), generator=gen).to(torch.float64)  # many exact ties
    _, weights, idx = route(backend, logits, 4)
    for row in range(40):
        order = sorted(range(9), key=lambda e: (-logits[row, e].item(), e))
        assert idx[row].tolist() == order[:4]
    _, weights_again, idx_again = route(backend, logits, 4)
    assert torch.equal(idx, idx_again) and torch.equal(weights, weights_again)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_route_replays_forced_experts(backend, norm_topk_prob):
    """Routing replay: the given experts, weighted by their current softmax probabilities."""
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(23, 10, generator=gen, dtype=torch.float64)
    forced = torch.randint(0, 10, (23, 3), generator=gen)
    forced[0] = torch.tensor([4, 4, 9])  # a repeated expert counts twice, as a recorded routing would
    grad = torch.randn(23, 3, generator=gen, dtype=torch.float64)
    expected_leaf = logits.clone().requires_grad_()
    expected = torch.softmax(expected_leaf, dim=-1).gather(1, forced)
    if norm_topk_prob:
        expected = expected / expected.sum(dim=-1, keepdim=True)
    (expected * grad).sum().backward()
    forced_on_device = forced.to(device_of(backend))
    leaf, weights, idx = route(backend, logits, 3, norm_topk_prob=norm_topk_prob, forced_experts=forced_on_device)
    (weights * grad.to(weights)).sum().backward()
    assert torch.equal(idx.cpu(), forced)
    dtype = dtype_of(backend)
    assert_close(weights, expected.detach(), dtype, "weights")
    assert_close(leaf.grad, expected_leaf.grad, dtype, "d router_logits")


# ---------------------------------------------------------------------------------------------
# Validation


def valid_expert_args(tokens=5, hidden=8, inter=4, experts=3, top_k=2):
    return dict(
        x=torch.randn(tokens, hidden),
        topk_idx=torch.randint(0, experts, (tokens, top_k)),
        topk_weights=torch.rand(tokens, top_k),
        w_gate_up=torch.randn(experts, 2 * inter, hidden),
        w_down=torch.randn(experts, hidden, inter),
    )


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
@pytest.mark.parametrize("bad", [3, -1, 100])
def test_expert_index_out_of_range_raises(backend, bad):
    args = valid_expert_args()
    args["topk_idx"][2, 1] = bad
    with gk.use_backend(backend), pytest.raises(ValueError, match="topk_idx must lie in"):
        gk.moe_experts(**args)


@pytest.mark.parametrize(
    "change, name",
    [
        (dict(x=torch.randn(5, 8, 1)), "x"),
        (dict(x=torch.randint(0, 3, (5, 8))), "x"),
        (dict(topk_idx=torch.zeros(4, 2, dtype=torch.int64)), "topk_idx"),
        (dict(topk_idx=torch.zeros(5, 2)), "topk_idx"),
        (dict(topk_weights=torch.rand(5, 3)), "topk_weights"),
        (dict(w_gate_up=torch.randn(3, 8, 7)), "w_gate_up"),
        (dict(w_gate_up=torch.randn(3, 7, 8)), "w_gate_up"),
        (dict(w_down=torch.randn(3, 8, 5)), "w_down"),
        (dict(w_down=torch.randn(3, 8, 4, dtype=torch.float64)), "w_down"),
        (dict(x=[[1.0]]), "x"),
    ],
)
def test_bad_expert_arguments_raise_naming_the_argument(change, name):
    args = valid_expert_args()
    args.update(change)
    with pytest.raises(ValueError, match=f"^{name} "):
        gk.moe_experts(**args)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(router_logits=torch.randn(4, 3), top_k=4), "top_k"),
        (dict(router_logits=torch.randn(4, 3), top_k=0), "top_k"),
        (dict(router_logits=torch.randn(4, 3), top_k=2.0), "top_k"),
        (dict(router_logits=torch.randn(4, 3, 1), top_k=1), "router_logits"),
        (dict(router_logits=torch.randn(4, 3), top_k=2, forced_experts=torch.zeros(4, 3, dtype=torch.int64)),
         "forced_experts"),
        (dict(router_logits=torch.randn(4, 3), top_k=2, forced_experts=torch.full((4, 2), 3)), "forced_experts"),
    ],
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_route_arguments_raise_naming_the_argument(kwargs, name, backend):
    with gk.use_backend(backend), pytest.raises(ValueError, match=f"^{name} "):
        gk.moe_route(**kwargs)
