"""MoE experts forward + backward: gk.moe_experts against transformers' Qwen3-MoE experts and the reference.

Implementations: "gspo_kernels" (Triton on a GPU, the grouped PyTorch path elsewhere),
"transformers-grouped_mm" and "transformers-eager" (Qwen3MoeExperts with that experts
implementation) and "reference" (the per-expert loop of gspo_kernels.reference). FLOPs below
count the experts' three GEMMs.

Each shape also has a routing case: the router's linear, softmax and top-k (gk.moe_route against
gspo_kernels.reference's), forward + backward, in tokens/s; its median beside the experts' median of
the same shape tells the routing's share of the layer.
"""

from __future__ import annotations

import math

import torch

import gspo_kernels as gk
from gspo_engine.benchmarks.cases import Case
from gspo_kernels import reference

# (label, tokens N, experts E, top_k k, hidden H, intermediate I): Qwen3-30B-A3B and
# Qwen3-235B-A22B layers on a GPU; on CPU Qwen3-30B-A3B's routing (E = 128, k = 8) at narrow widths;
# a smoke shape for tests.
SHAPES = {
    "gpu": [
        ("30b-a3b-n256", 256, 128, 8, 2048, 768),
        ("30b-a3b-n4096", 4096, 128, 8, 2048, 768),
        ("30b-a3b-n16384", 16384, 128, 8, 2048, 768),
        ("235b-a22b-n8192", 8192, 128, 8, 4096, 1536),
    ],
    "cpu": [("cpu-n4096", 4096, 128, 8, 256, 128)],
    "smoke": [("smoke-n64", 64, 8, 2, 32, 16)],
}
# The eager loop above this many tokens only confirms what N = 4096 shows, at many times the cost.
EAGER_MAX_TOKENS_ON_GPU = 4096


IMPLEMENTATIONS = ("reference", "gspo_kernels", "transformers-grouped_mm", "transformers-eager")


def experts_flops(tokens: int, top_k: int, hidden: int, intermediate: int) -> int:
    """Forward + backward FLOPs of the experts: 3 GEMMs of 2*N*k*H*I forward, twice that backward."""
    return 6 * tokens * top_k * 3 * hidden * intermediate


def make_layer(tokens, experts, top_k, hidden, intermediate, device, dtype, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    logits = torch.randn(tokens, experts, generator=gen, device=device)
    weights, idx = gk.moe_route(logits, top_k)

    def param(*shape, fan_in):
        return (torch.randn(*shape, generator=gen, device=device) / math.sqrt(fan_in)).to(dtype).requires_grad_()

    return dict(
        x=param(tokens, hidden, fan_in=1),
        topk_idx=idx,
        topk_weights=weights.to(dtype).requires_grad_(),
        w_gate_up=param(experts, 2 * intermediate, hidden, fan_in=hidden),
        w_down=param(experts, hidden, intermediate, fan_in=intermediate),
        grad_y=torch.randn(tokens, hidden, generator=gen, device=device).to(dtype),
    )


def transformers_module(layer, implementation):
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    experts, two_inter, hidden = layer["w_gate_up"].shape
    config = Qwen3MoeConfig(
        hidden_size=hidden, moe_intermediate_size=two_inter // 2, num_experts=experts,
        num_experts_per_tok=layer["topk_idx"].shape[1], hidden_act="silu",
    )
    config._experts_implementation = implementation
    weight = layer["w_gate_up"]
    module = Qwen3MoeExperts(config).to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        module.gate_up_proj.copy_(layer["w_gate_up"])
        module.down_proj.copy_(layer["w_down"])
    return module


def experts_forward(layer, implementation):
    """A closure running the forward of `implementation` on `layer`, and the tensors it only reads."""
    x, idx, weights = layer["x"], layer["topk_idx"], layer["topk_weights"]
    inputs = [x, idx, weights, layer["w_gate_up"], layer["w_down"]]
    if implementation.startswith("transformers-"):
        module = transformers_module(layer, implementation.split("-", 1)[1])
        inputs += list(module.parameters())
        return (lambda: module(x, idx, weights)), inputs
    if implementation == "reference":
        return (lambda: reference.moe_experts_reference(*inputs)), inputs
    return (lambda: gk.moe_experts(*inputs)), inputs


def forward_backward_step(layer, implementation):
    forward, _ = experts_forward(layer, implementation)

    def step():
        forward().backward(layer["grad_y"])

    return step


ROUTING_IMPLEMENTATIONS = ("reference", "gspo_kernels")


def routing_step(tokens, experts, top_k, hidden, device, dtype, implementation, seed=0):
    """Router linear -> softmax -> top-k (renormalised), forward + backward into the hidden states and the router."""
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=gen, device=device).to(dtype).requires_grad_()
    router = (torch.randn(experts, hidden, generator=gen, device=device) / math.sqrt(hidden)).to(dtype).requires_grad_()
    grad_weights = torch.randn(tokens, top_k, generator=gen, device=device)
    route = reference.moe_route_reference if implementation == "reference" else gk.moe_route

    def step():
        weights, _ = route(x @ router.T, top_k, norm_topk_prob=True)
        weights.backward(grad_weights.to(weights.dtype))

    return step


def saved_for_backward_mib(forward, inputs) -> float:
    """Activation memory: what autograd keeps from the forward pass for backward, inputs and weights aside."""
    skip = {tensor.untyped_storage().data_ptr() for tensor in inputs}
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in skip:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        forward()
    return sum(saved.values()) / 2**20


def cases(device: torch.device, scale: str) -> list[Case]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    result = []
    for label, tokens, experts, top_k, hidden, intermediate in SHAPES[scale]:
        def builder(name, shape=(tokens, experts, top_k, hidden, intermediate)):
            return lambda: forward_backward_step(make_layer(*shape, device, dtype), name)

        names = list(IMPLEMENTATIONS)
        skipped = {}
        if device.type == "cuda" and tokens > EAGER_MAX_TOKENS_ON_GPU:
            names.remove("transformers-eager")
            skipped["transformers-eager"] = f"eager loop measured up to N={EAGER_MAX_TOKENS_ON_GPU}"
        result.append(Case(
            kernel="moe",
            name=f"{label} E={experts} k={top_k} H={hidden} I={intermediate} {str(dtype).removeprefix('torch.')}",
            unit="TFLOP/s",
            work=experts_flops(tokens, top_k, hidden, intermediate),
            builders={name: builder(name) for name in names},
            skipped=skipped,
            max_rounds=10 if device.type == "cuda" else 3,
        ))
        result.append(Case(
            kernel="moe",
            name=f"{label} routing E={experts} k={top_k} H={hidden} {str(dtype).removeprefix('torch.')}",
            unit="tokens/s",
            work=tokens,
            builders={name: (lambda name=name, shape=(tokens, experts, top_k, hidden):
                             routing_step(*shape, device, dtype, name)) for name in ROUTING_IMPLEMENTATIONS},
            max_rounds=10 if device.type == "cuda" else 3,
        ))
    return result
