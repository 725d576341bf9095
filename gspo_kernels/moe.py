"""Qwen3-MoE routing and grouped SwiGLU experts: public functions, validation, autograd, CPU path.

    topk_weights, topk_idx = moe_route(router_logits [N, E], top_k)
    y [N, H] = moe_experts(x [N, H], topk_idx [N, k], topk_weights [N, k], w_gate_up [E, 2I, H], w_down [E, H, I])
    y[n] = sum_j topk_weights[n, j] * down_e(silu(gate_e(x_n)) * up_e(x_n)),  e = topk_idx[n, j]

The experts run the same algorithm in the Triton kernels (gspo_kernels/moe_triton.py) and in
the PyTorch path below, on the N*k (token, slot) pairs, pair p = token * k + slot:

1. permutation: a stable sort of the pairs by expert, an `ExpertOrder`
   (gspo_kernels/expert_order.py). `sorted_pair[s]` is the pair at sorted row s; the rows of one
   expert are contiguous and in token order. Nothing is copied: the GPU kernels read each pair's
   row of x (or of dy) through these indices.
2. gate/up: gate_up[s] = x[token(s)] @ w_gate_up[e]^T, h[s] = silu(gate) * up.
3. down: each pair's row w[p] * (h[s] @ w_down[e]^T) is added to its token's row of y. The
   Triton kernels write it to its own row p of an [N*k, H] buffer, summed over the k slots
   afterwards; the PyTorch path adds the rows with a sequential index_add_. No atomics either
   way: results are bitwise reproducible run to run.

Backward keeps the gate/up pre-activations [N*k, 2I] from the forward pass (h is recomputed from
them, not stored) plus the inputs and the permutation; it computes dh = dy[token] @ w_down[e],
d topk_weights = <dh, h>, the SwiGLU derivative, dx through w_gate_up (scattered and summed over
slots as in forward) and the weight gradients as per-expert sums of X^T dY. Experts that receive
no token get exactly zero gradient.

Routing ranks experts by logit (the order of the softmax probabilities), ties going to the lower
expert index on every backend, so routing is deterministic.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from gspo_kernels import reference
from gspo_kernels.backend import resolve_backend
from gspo_kernels.expert_order import ExpertOrder
from gspo_kernels.validation import describe, holds_integers, require_tensor, value_range


def validate_expert_indices(name: str, indices: torch.Tensor, num_experts: int) -> None:
    """Raise ValueError unless `indices` holds integers in [0, num_experts) (one host sync)."""
    if not holds_integers(indices):
        raise ValueError(f"{name} must hold integer expert indices; got {describe(name, indices)}")
    if indices.numel() == 0:
        return
    low, high = value_range(indices)
    if low < 0 or high >= num_experts:
        raise ValueError(f"{name} must lie in [0, E = {num_experts}); got values from {low} to {high}")


def validate_route_inputs(router_logits, top_k, forced_experts) -> None:
    """Raise ValueError naming the argument for every input moe_route cannot take."""
    require_tensor("router_logits", router_logits)
    if router_logits.dim() != 2 or not router_logits.is_floating_point():
        got = describe("router_logits", router_logits)
        raise ValueError(f"router_logits must be a floating-point [N, E] tensor; got {got}")
    num_experts = router_logits.shape[1]
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be an int in [1, E = {num_experts}]; got {top_k!r}")
    if forced_experts is not None:
        require_tensor("forced_experts", forced_experts)
        if tuple(forced_experts.shape) != (router_logits.shape[0], top_k):
            raise ValueError(
                f"forced_experts must be [N, top_k] = [{router_logits.shape[0]}, {top_k}]; "
                f"got {describe('forced_experts', forced_experts)}"
            )
        if forced_experts.device != router_logits.device:
            raise ValueError("forced_experts must be on the device of router_logits")
        validate_expert_indices("forced_experts", forced_experts, num_experts)


def validate_experts_inputs(x, topk_idx, topk_weights, w_gate_up, w_down) -> None:
    """Raise ValueError naming the argument for every input moe_experts cannot take."""
    num_experts = validate_experts_shapes(x, topk_idx, topk_weights, w_gate_up, w_down)
    validate_expert_indices("topk_idx", topk_idx, num_experts)


def validate_experts_shapes(x, topk_idx, topk_weights, w_gate_up, w_down) -> int:
    """moe_experts' argument checks except the range of topk_idx; returns E, the experts in w_gate_up.

    An expert-parallel rank holds global expert indices next to its own block of the experts, so
    the range is its caller's to check.
    """
    named = {"x": x, "topk_idx": topk_idx, "topk_weights": topk_weights, "w_gate_up": w_gate_up, "w_down": w_down}
    for name, value in named.items():
        require_tensor(name, value)
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"x must be a floating-point [N, H] tensor; got {describe('x', x)}")
    tokens, hidden = x.shape
    if topk_idx.dim() != 2 or topk_idx.shape[0] != tokens or topk_idx.shape[1] < 1:
        raise ValueError(f"topk_idx must be [N = {tokens}, k] with k >= 1; got {describe('topk_idx', topk_idx)}")
    if topk_weights.shape != topk_idx.shape or not topk_weights.is_floating_point():
        raise ValueError(
            f"topk_weights must be floating point with the shape of topk_idx {tuple(topk_idx.shape)}; "
            f"got {describe('topk_weights', topk_weights)}"
        )
    if w_gate_up.dim() != 3 or w_gate_up.shape[2] != hidden or w_gate_up.shape[1] % 2 or w_gate_up.shape[1] == 0:
        raise ValueError(f"w_gate_up must be [E, 2I, H = {hidden}]; got {describe('w_gate_up', w_gate_up)}")
    num_experts, intermediate = w_gate_up.shape[0], w_gate_up.shape[1] // 2
    if tuple(w_down.shape) != (num_experts, hidden, intermediate):
        raise ValueError(
            f"w_down must be [E, H, I] = [{num_experts}, {hidden}, {intermediate}]; got {describe('w_down', w_down)}"
        )
    for name in ("w_gate_up", "w_down"):
        if named[name].dtype != x.dtype:
            raise ValueError(f"{name} must have the dtype of x ({x.dtype}); got {describe(name, named[name])}")
    for name, value in named.items():
        if value.device != x.device:
            raise ValueError(f"{name} must be on the device of x ({x.device}); got {value.device}")
    return num_experts


# ---------------------------------------------------------------------------------------------
# Routing


def route_topk(
    router_logits: torch.Tensor, top_k: int, norm_topk_prob: bool, forced_experts: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch path of moe_route; autograd differentiates it."""
    logits = router_logits.to(torch.promote_types(router_logits.dtype, torch.float32))
    probs = torch.softmax(logits, dim=-1)
    if forced_experts is None:
        # A stable sort keeps equal logits in expert order: ties go to the lower index, as in
        # the Triton kernel (torch.topk leaves the order of ties unspecified).
        topk_idx = torch.sort(logits.detach(), dim=-1, descending=True, stable=True).indices[:, :top_k]
    else:
        topk_idx = forced_experts.to(torch.int64)
    topk_weights = probs.gather(1, topk_idx)
    if norm_topk_prob:
        topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
    return topk_weights, topk_idx


def route_backward(
    router_logits: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_idx: torch.Tensor,
    grad_weights: torch.Tensor,
    norm_topk_prob: bool,
) -> torch.Tensor:
    """d router_logits [N, E] from d topk_weights [N, k].

    Renormalised, the weights are a softmax over the chosen logits alone (the full softmax
    denominator cancels), so only chosen logits get gradient: w * (dw - <w, dw>). Without
    renormalisation w = p[idx] and every logit gets -p * <w, dw> on top of w * dw at the chosen ones.
    scatter_add sums the slots of an expert chosen twice (possible with forced experts).
    """
    weights = topk_weights.to(grad_weights.dtype)
    weighted = weights * grad_weights
    if norm_topk_prob:
        chosen = weighted - weights * weighted.sum(dim=-1, keepdim=True)
        grad = torch.zeros(router_logits.shape, dtype=grad_weights.dtype, device=grad_weights.device)
    else:
        probs = torch.softmax(router_logits.to(grad_weights.dtype), dim=-1)
        chosen = weighted
        grad = -probs * weighted.sum(dim=-1, keepdim=True)
    return grad.scatter_add_(1, topk_idx, chosen).to(router_logits.dtype)


class _RouteTopKTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, router_logits, top_k, norm_topk_prob, forced_experts):
        from gspo_kernels import moe_triton

        topk_weights, topk_idx = moe_triton.route_topk(router_logits, top_k, norm_topk_prob, forced_experts)
        ctx.save_for_backward(router_logits, topk_weights, topk_idx)
        ctx.norm_topk_prob = norm_topk_prob
        ctx.mark_non_differentiable(topk_idx)
        return topk_weights, topk_idx

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_weights, _grad_idx):
        router_logits, topk_weights, topk_idx = ctx.saved_tensors
        grad = route_backward(router_logits, topk_weights, topk_idx, grad_weights, ctx.norm_topk_prob)
        return grad, None, None, None


def moe_route(
    router_logits: torch.Tensor,
    top_k: int,
    *,
    norm_topk_prob: bool = True,
    forced_experts: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen3-MoE routing: softmax in fp32, top-k, renormalised when `norm_topk_prob`.

    router_logits [N, E] -> topk_weights [N, k] (fp32, fp64 for fp64 logits; differentiable with
    respect to router_logits) and topk_idx [N, k] (int64). Ties go to the lower expert index.

    Routing replay: with forced_experts [N, k] (experts recorded at rollout) those experts are
    returned as topk_idx and the weights are their softmax probabilities under the current logits
    (renormalised when asked), so the router keeps its gradient.
    """
    validate_route_inputs(router_logits, top_k, forced_experts)
    backend = resolve_backend(router_logits)
    if backend == "reference" and forced_experts is None:
        return reference.moe_route_reference(router_logits, top_k, norm_topk_prob=norm_topk_prob)
    if backend == "triton" and router_logits.dtype != torch.float64 and router_logits.shape[0] > 0:
        return _RouteTopKTriton.apply(router_logits, top_k, bool(norm_topk_prob), forced_experts)
    return route_topk(router_logits, top_k, norm_topk_prob, forced_experts)


# ---------------------------------------------------------------------------------------------
# Experts: PyTorch path


def sort_by_expert(topk_idx: torch.Tensor, num_experts: int) -> ExpertOrder:
    """The (token, slot) pairs of topk_idx [N, k] sorted stably by expert (PyTorch path, the kernels' order)."""
    flat = topk_idx.reshape(-1)
    sorted_pair = torch.sort(flat, stable=True).indices
    counts = torch.bincount(flat, minlength=num_experts)
    return ExpertOrder(sorted_pair, counts, torch.cumsum(counts, 0) - counts, topk_idx.shape[1])


def _aligned_16(tensor: torch.Tensor) -> bool:
    size = tensor.element_size()
    strides = (stride for stride, dim in zip(tensor.stride(), tensor.shape, strict=True) if stride != 1 and dim > 1)
    return tensor.data_ptr() % 16 == 0 and all((stride * size) % 16 == 0 for stride in strides)


def _grouped_mm_fits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """torch._grouped_mm on CPU takes fp32/bf16 operands whose strides are multiples of 16 bytes."""
    return (
        hasattr(torch, "_grouped_mm")
        and a.device.type == "cpu"
        and a.dtype in (torch.float32, torch.bfloat16)
        and a.dtype == b.dtype
        and a.shape[0] > 0
        and _aligned_16(a)
        and _aligned_16(b)
    )


def _expert_rows(order: ExpertOrder):
    """(expert, first row, end row) of every expert that receives at least one pair."""
    ends = torch.cumsum(order.counts, 0).tolist()
    for expert, count in enumerate(order.counts.tolist()):
        if count:
            yield expert, ends[expert] - count, ends[expert]


def grouped_matmul(a: torch.Tensor, b: torch.Tensor, order: ExpertOrder) -> torch.Tensor:
    """a [S, K] in sorted rows, b [E, K, M] -> [S, M]: the rows of expert e times b[e]."""
    if _grouped_mm_fits(a, b):
        return torch._grouped_mm(a, b, offs=torch.cumsum(order.counts, 0).to(torch.int32))
    out = a.new_empty(a.shape[0], b.shape[2])
    for expert, start, end in _expert_rows(order):
        torch.mm(a[start:end], b[expert], out=out[start:end])
    return out


def grouped_weight_grad(a: torch.Tensor, b: torch.Tensor, order: ExpertOrder) -> torch.Tensor:
    """a [S, M], b [S, K] in sorted rows -> [E, M, K]: sum over the rows of expert e of a^T b."""
    a_t = a.t()
    if _grouped_mm_fits(a_t, b):
        return torch._grouped_mm(a_t, b, offs=torch.cumsum(order.counts, 0).to(torch.int32))
    out = a.new_zeros(order.counts.shape[0], a.shape[1], b.shape[1])
    for expert, start, end in _expert_rows(order):
        torch.mm(a_t[:, start:end], b[start:end], out=out[expert])
    return out


def _sorted_row_of_pair(order: ExpertOrder) -> torch.Tensor:
    """[S]: the sorted row of every pair, the inverse of sorted_pair."""
    rows = torch.empty_like(order.sorted_pair)
    rows[order.sorted_pair] = torch.arange(rows.numel(), device=rows.device)
    return rows


def sum_over_slots(rows: torch.Tensor, sorted_pair: torch.Tensor, top_k: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows [N*k, H] in sorted order -> [N, H] in `dtype`: each added to its token's row in at least fp32.

    index_add_ runs sequentially over the rows on CPU, so the sum is deterministic there (and
    several times faster than gathering the rows back into pair order first).
    """
    accumulate = torch.promote_types(rows.dtype, torch.float32)
    tokens = sorted_pair.numel() // top_k
    out = torch.zeros(tokens, rows.shape[1], dtype=accumulate, device=rows.device)
    return out.index_add_(0, sorted_pair // top_k, rows.to(accumulate)).to(dtype)


def experts_forward(x, topk_weights, w_gate_up, w_down, order: ExpertOrder, keep_gate_up: bool):
    """PyTorch path: y [N, H] and, when keep_gate_up, the pre-activations [S, 2I] backward needs."""
    token = order.sorted_pair // order.top_k
    gate_up = grouped_matmul(x[token], w_gate_up.transpose(1, 2), order)
    gate, up = gate_up.chunk(2, dim=-1)
    hidden = F.silu(gate).mul_(up)
    out = grouped_matmul(hidden, w_down.transpose(1, 2), order)
    out.mul_(topk_weights.reshape(-1)[order.sorted_pair, None])
    return sum_over_slots(out, order.sorted_pair, order.top_k, x.dtype), (gate_up if keep_gate_up else None)


def experts_backward(grad_y, x, topk_weights, w_gate_up, w_down, order: ExpertOrder, gate_up, needs_grad):
    """PyTorch path: (dx, d topk_weights, d w_gate_up, d w_down), None where needs_grad is False."""
    token = order.sorted_pair // order.top_k
    weight = topk_weights.reshape(-1)[order.sorted_pair, None]
    grad_y_rows = grad_y.to(x.dtype)[token]
    grad_hidden = grouped_matmul(grad_y_rows, w_down, order)
    gate, up = gate_up.chunk(2, dim=-1)
    silu = F.silu(gate)
    hidden = silu * up
    grad_weights = None
    if needs_grad[1]:
        compute = torch.promote_types(x.dtype, torch.float32)  # bf16 dot products summed in fp32
        per_row = torch.linalg.vecdot(grad_hidden.to(compute), hidden.to(compute))
        grad_weights = per_row[_sorted_row_of_pair(order)].view(topk_weights.shape).to(topk_weights.dtype)
    grad_hidden.mul_(weight)
    intermediate = gate.shape[1]
    grad_gate_up = torch.empty_like(gate_up)
    torch.mul(grad_hidden, silu, out=grad_gate_up[:, intermediate:])
    grad_gate_up[:, :intermediate] = torch.ops.aten.silu_backward(grad_hidden.mul_(up), gate)
    grad_x = None
    if needs_grad[0]:
        grad_x = sum_over_slots(grouped_matmul(grad_gate_up, w_gate_up, order), order.sorted_pair, order.top_k, x.dtype)
    grad_w_gate_up = grouped_weight_grad(grad_gate_up, x[token], order) if needs_grad[2] else None
    # (w dy)^T h = dy^T (w h): scaling h [S, I] is cheaper than scaling dy [S, H].
    grad_w_down = grouped_weight_grad(grad_y_rows, hidden.mul_(weight), order) if needs_grad[3] else None
    return grad_x, grad_weights, grad_w_gate_up, grad_w_down


class ExpertOps(NamedTuple):
    """One backend's implementation of the three steps; both share the signatures above."""

    sort_by_expert: Callable
    forward: Callable
    backward: Callable


TORCH_OPS = ExpertOps(sort_by_expert, experts_forward, experts_backward)


def _triton_ops() -> ExpertOps:
    from gspo_kernels import moe_triton

    return ExpertOps(moe_triton.sort_by_expert, moe_triton.experts_forward, moe_triton.experts_backward)


class _GroupedSwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, topk_idx, topk_weights, w_gate_up, w_down, ops):
        order = ops.sort_by_expert(topk_idx, w_gate_up.shape[0])
        y, gate_up = ops.forward(x, topk_weights, w_gate_up, w_down, order, True)
        ctx.save_for_backward(
            x, topk_weights, w_gate_up, w_down, gate_up, order.sorted_pair, order.counts, order.starts
        )
        ctx.top_k = order.top_k
        ctx.ops = ops
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x, topk_weights, w_gate_up, w_down, gate_up, sorted_pair, counts, starts = ctx.saved_tensors
        order = ExpertOrder(sorted_pair, counts, starts, ctx.top_k)
        needs = (ctx.needs_input_grad[0],) + tuple(ctx.needs_input_grad[2:5])
        grad_x, grad_weights, grad_w_gate_up, grad_w_down = ctx.ops.backward(
            grad_y, x, topk_weights, w_gate_up, w_down, order, gate_up, needs
        )
        return grad_x, None, grad_weights, grad_w_gate_up, grad_w_down, None


def moe_experts(
    x: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_weights: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
) -> torch.Tensor:
    """Grouped SwiGLU experts of Qwen3-MoE, y [N, H] in the dtype of x.

    x [N, H]; topk_idx [N, k] integer in [0, E); topk_weights [N, k] (any float dtype, applied in
    fp32); w_gate_up [E, 2I, H] (gate rows first, then up), w_down [E, H, I], both in the dtype of x.
    Differentiable with respect to x, topk_weights, w_gate_up and w_down. float64 inputs and
    empty batches run the PyTorch path on every device.
    """
    validate_experts_inputs(x, topk_idx, topk_weights, w_gate_up, w_down)
    return _run_experts(x, topk_idx, topk_weights, w_gate_up, w_down)


def routed_experts(
    x: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_weights: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
) -> torch.Tensor:
    """moe_experts for the topk_idx that moe_route returned, which lie in [0, E) by construction (its top-k,
    or forced experts it has checked).

    Every check of moe_experts but the range of topk_idx, the one that reads values back to the host:
    a wait for the device at every call, and an error while a CUDA graph is being captured.
    """
    validate_experts_shapes(x, topk_idx, topk_weights, w_gate_up, w_down)
    return _run_experts(x, topk_idx, topk_weights, w_gate_up, w_down)


def _run_experts(x, topk_idx, topk_weights, w_gate_up, w_down) -> torch.Tensor:
    backend = resolve_backend(x)
    if backend == "reference":
        return reference.moe_experts_reference(x, topk_idx, topk_weights, w_gate_up, w_down)
    use_triton = backend == "triton" and x.dtype != torch.float64 and x.shape[0] > 0
    ops = _triton_ops() if use_triton else TORCH_OPS
    differentiable = (x, topk_weights, w_gate_up, w_down)
    if torch.is_grad_enabled() and any(t.requires_grad for t in differentiable):
        return _GroupedSwiGLU.apply(x, topk_idx, topk_weights, w_gate_up, w_down, ops)
    order = ops.sort_by_expert(topk_idx, w_gate_up.shape[0])
    return ops.forward(x, topk_weights, w_gate_up, w_down, order, False)[0]
