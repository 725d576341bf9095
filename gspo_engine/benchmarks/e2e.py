"""End to end: one GSPO update step and one rollout batch, ours against the common way.

The model: Qwen3-30B-A3B's widths at 4 layers (a GPU), or the same structure with narrower
widths where the full ones would take minutes (CPU), random weights, all layers MoE.

"gspo_engine": gspo_engine's Qwen3Model -> hidden states -> gk.fused_linear_gspo_loss ->
backward -> AdamW; the rollout is gspo_engine.generate (slot-pool decoding, CUDA graphs on a GPU;
each call captures its own graphs, and the timing includes that).
"transformers": Qwen3MoeForCausalLM with its best experts implementation (grouped_mm where
registered) -> logits [B, T, V] materialized -> selective_log_softmax as TRL computes it ->
the sequence-level GSPO loss of gspo_kernels.reference -> backward -> AdamW; the rollout is
its generate. The baseline of the ratios.

Both on-policy (old log-probs = the current ones, detached), bf16 on a GPU, fp32 on CPU.
MFU divides the model FLOPs below by the bf16 matmul ceiling measured on the same card.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import gspo_kernels as gk
from gspo_engine.benchmarks.cases import Case
from gspo_engine.model import ModelArgs, Qwen3Model
from gspo_engine.planner.released_shapes import RELEASED_SHAPES
from gspo_engine.rollout import generate
from gspo_kernels import reference

OURS, COMMON = "gspo_engine", "transformers"
WIDTH_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
    "num_experts", "num_experts_per_tok", "moe_intermediate_size",
)
QWEN3_30B_A3B_WIDTHS = {key: RELEASED_SHAPES["Qwen3-30B-A3B"][key] for key in WIDTH_KEYS}
NARROW_WIDTHS = dict(
    vocab_size=8192, hidden_size=256, intermediate_size=768, num_attention_heads=8, num_key_value_heads=4,
    head_dim=32, num_experts=16, num_experts_per_tok=4, moe_intermediate_size=128,
)
SMOKE_WIDTHS = dict(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
)
# widths, layers, (update batch, update length), (rollout batches, prompt length, new tokens)
SCALES = {
    "gpu": ("30b-a3b-widths", QWEN3_30B_A3B_WIDTHS, 4, (8, 1024), ((64, 256, 512), 128, 128)),
    "cpu": ("narrow-widths", NARROW_WIDTHS, 4, (4, 64), ((4, 16, 64), 16, 16)),
    "smoke": ("smoke-widths", SMOKE_WIDTHS, 2, (2, 8), ((2,), 4, 4)),
}


def model_dict(widths: dict, layers: int) -> dict:
    return dict(widths, num_hidden_layers=layers, norm_topk_prob=True, max_position_embeddings=40960,
                tie_word_embeddings=False)


def matmul_params_per_token(model: dict) -> int:
    """Weights one token multiplies by: attention projections, router, its k experts, lm_head."""
    hidden, head_dim = model["hidden_size"], model["head_dim"]
    attention = hidden * head_dim * 2 * (model["num_attention_heads"] + model["num_key_value_heads"])
    experts = model["num_experts_per_tok"] * 3 * hidden * model["moe_intermediate_size"]
    router = hidden * model["num_experts"]
    return model["num_hidden_layers"] * (attention + router + experts) + hidden * model["vocab_size"]


def forward_flops_per_token(model: dict, context: float) -> float:
    """2 FLOPs per weight, plus QK^T and attention x V: 2 * 2 * heads * head_dim per key attended;
    `context` is the mean number of keys a token attends to (half the length under a causal mask)."""
    attention_per_key = 4 * model["num_attention_heads"] * model["head_dim"]
    return 2 * matmul_params_per_token(model) + model["num_hidden_layers"] * attention_per_key * context


def update_flops(model: dict, batch: int, length: int) -> float:
    """Forward + backward (twice the forward) over B x T tokens."""
    return 3 * forward_flops_per_token(model, length / 2) * batch * length


def rollout_flops(model: dict, batch: int, prompt: int, new: int) -> float:
    """Every prompt and completion token passes the model once, attending to half the final length on average."""
    return forward_flops_per_token(model, (prompt + new) / 2) * batch * (prompt + new)


def our_model(model: dict, device: torch.device, dtype: torch.dtype) -> Qwen3Model:
    with device:
        net = Qwen3Model(ModelArgs(dtype=dtype, **model))
    return net.to(dtype)


def best_experts_implementation() -> str:
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    except ImportError:
        return "eager"
    return "grouped_mm" if "grouped_mm" in ALL_EXPERTS_FUNCTIONS else "eager"


def transformers_model(model: dict, device: torch.device, dtype: torch.dtype):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(hidden_act="silu", **model)
    config._experts_implementation = best_experts_implementation()
    with device:
        net = Qwen3MoeForCausalLM(config)
    net.generation_config.eos_token_id = None  # every row decodes all its new tokens, as ours does
    return net.to(dtype)


def selective_log_softmax(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[B, T, V], [B, T] -> [B, T] as TRL computes it: the target logit minus a per-row logsumexp in
    fp32; row by row through log_softmax in bf16, where the logsumexp loses precision."""
    if logits.dtype in (torch.float32, torch.float64):
        picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        return picked - torch.stack([torch.logsumexp(row, dim=-1) for row in logits])
    rows = [F.log_softmax(row, dim=-1).gather(-1, row_targets.unsqueeze(-1)).squeeze(-1)
            for row, row_targets in zip(logits, targets)]
    return torch.stack(rows)


def update_batch(model: dict, batch: int, length: int, device: torch.device):
    """Token ids [B, T + 1], a response mask [B, T] (the first quarter is prompt), advantages [B]."""
    gen = torch.Generator(device=device).manual_seed(0)
    tokens = torch.randint(0, model["vocab_size"], (batch, length + 1), generator=gen, device=device)
    mask = (torch.arange(length, device=device) >= length // 4).expand(batch, length).contiguous()
    advantages = torch.randn(batch, generator=gen, device=device)
    return tokens, mask, advantages


def update_step(implementation: str, model: dict, batch: int, length: int, device: torch.device, dtype):
    tokens, mask, advantages = update_batch(model, batch, length, device)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    if implementation == OURS:
        net = our_model(model, device, dtype)

        def loss():
            hidden = net.forward_hidden(inputs).hidden_states
            return gk.fused_linear_gspo_loss(hidden, net.lm_head_weight, targets, None, advantages, mask)[0]
    else:
        net = transformers_model(model, device, dtype)

        def loss():
            logps = selective_log_softmax(net(input_ids=inputs, use_cache=False).logits, targets)
            return reference.gspo_loss_reference(logps, logps.detach(), advantages, mask, level="sequence")[0]

    # Fused on CUDA for both: our trainer's AdamW (gspo_engine.optim) and transformers' Trainer default
    # (adamw_torch_fused on torch >= 2.8), which TRL's GRPOTrainer inherits.
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-6, fused=device.type == "cuda" or None)

    def step():
        loss().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def rollout_step(implementation: str, model: dict, batch: int, prompt: int, new: int, device: torch.device, dtype):
    gen = torch.Generator(device=device).manual_seed(0)
    prompts = torch.randint(0, model["vocab_size"], (batch, prompt), generator=gen, device=device)
    if implementation == OURS:
        net = our_model(model, device, dtype).eval()
        prompt_lists = prompts.tolist()

        def step():
            with torch.no_grad():
                generate(net, prompt_lists, max_new_tokens=new, temperature=1.0, seed=0)
    else:
        net = transformers_model(model, device, dtype).eval()

        def step():
            with torch.no_grad():
                net.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), do_sample=True,
                             temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=new, pad_token_id=0)

    return step


def cases(device: torch.device, scale: str) -> list[Case]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    label, widths, layers, (batch, length), (rollout_batches, prompt, new) = SCALES[scale]
    model = model_dict(widths, layers)
    dtype_name = str(dtype).removeprefix("torch.")
    shape = f"{label} {layers} layers {dtype_name}"
    update = Case(
        kernel="e2e", name=f"update B={batch} T={length} {shape}", unit="tokens/s", work=batch * length,
        flops=update_flops(model, batch, length), max_rounds=3, baseline=COMMON,
        builders={name: (lambda name=name: update_step(name, model, batch, length, device, dtype))
                  for name in (COMMON, OURS)},
    )
    rollouts = [
        Case(
            kernel="e2e", name=f"rollout B={rollout_batch} prompt={prompt} new={new} {shape}", unit="tokens/s",
            work=rollout_batch * new, flops=rollout_flops(model, rollout_batch, prompt, new), max_rounds=2,
            baseline=COMMON,
            builders={name: (lambda name=name, rows=rollout_batch: rollout_step(name, model, rows, prompt, new,
                                                                                device, dtype))
                      for name in (COMMON, OURS)},
        )
        for rollout_batch in rollout_batches
    ]
    return [update, *rollouts]
