"""Bytes per token that a micro-batch's tensors weigh, by how the run computes (dtypes, FSDP2 or not).

The terms follow gspo_engine/model/layers.py and moe.py tensor by tensor; docs/planner.md lists them.
"""

from __future__ import annotations

from dataclasses import dataclass

from gspo_engine.config import Config
from gspo_engine.model import ModelArgs
from gspo_engine.model.args import NEXT_ARCHITECTURE
from gspo_engine.model.gated_delta_rule import DEFAULT_CHUNK_SIZE


@dataclass(frozen=True)
class Compute:
    """How the run computes, as bytes of the tensors it keeps.

    residual: the stream between blocks; compute: matmul inputs and outputs (and the KV cache);
    weights: the weights gathered by FSDP2. Autocast casts a norm's fp32 output once for every
    matmul reading it (q, k, v: 3 copies; gate and up, or router and experts: 2); with bf16
    weights (FSDP2's param_dtype) nothing needs a cast.
    """

    label: str
    residual: int
    compute: int
    weights: int
    attention_copies: int
    mlp_copies: int
    sharded: bool  # FSDP2 over the GPUs

    @property
    def autocast_copies(self) -> bool:
        """bf16 copies of fp32 weights (one process under autocast)."""
        return self.compute == 2 and not self.sharded


def resolve_compute(config: Config, gpus: int) -> Compute:
    precision = config.train.precision
    named = precision
    if precision == "auto":  # what the trainer picks: bf16-mixed on a GPU, fp32 on a CPU
        precision = "fp32" if config.train.device == "cpu" else "bf16-mixed"
        named = f"{precision} (train.precision auto on a {'CPU' if precision == 'fp32' else 'GPU'})"
    if precision == "fp32":
        return Compute(named + (", FSDP2 in fp32" if gpus > 1 else ""), 4, 4, 4, 1, 1, gpus > 1)
    if gpus == 1:
        return Compute(f"{named}: autocast over fp32 weights", 4, 2, 2, 3, 2, False)
    return Compute(f"{named}: FSDP2, bf16 compute weights, fp32 gradient reduce-scatter", 2, 2, 2, 1, 1, True)


def norm_bytes(width: int, input_bytes: int) -> int:
    """What an RMSNorm of `width` keeps: its input in fp32 (or an fp32 copy), the normalised value in
    the input's dtype (the weight's gradient needs it) and the fp32 rsqrt."""
    return 4 * width + input_bytes * width + 4


def block_activation_bytes(args: ModelArgs, compute: Compute, moe: bool) -> int:
    """Bytes per token that one decoder block keeps for its backward (gspo_engine/model/layers.py, moe.py).

    Checked against what autograd saves in tests/test_plan.py. The MoE routing terms are those of
    the PyTorch routing path (the Triton one keeps a little less).
    """
    hidden, heads, kv_heads = args.hidden_size, args.num_attention_heads, args.num_key_value_heads
    head_dim, r, c = args.head_dim, compute.residual, compute.compute
    attention = (
        norm_bytes(hidden, r)
        + compute.attention_copies * c * hidden  # the norm's output, as the q / k / v matmuls read it
        + heads * norm_bytes(head_dim, c) + kv_heads * norm_bytes(head_dim, c)  # q and k norms
        + c * (heads + kv_heads) * head_dim  # q and k after RoPE, as attention reads them
        + c * kv_heads * head_dim  # v
        + c * heads * head_dim  # attention output, which is o_proj's input
        + 4 * heads  # attention's log-sum-exp
        + norm_bytes(hidden, r)  # post-attention norm
        + compute.mlp_copies * c * hidden  # its output, as the MLP (or router and experts) reads it
    )
    return attention + mlp_bytes(args, compute, moe)


def mlp_bytes(args: ModelArgs, compute: Compute, moe: bool) -> int:
    """What the dense MLP (gate, silu(gate), up, their product) or the routed experts keep, past their input."""
    c = compute.compute
    if not moe:
        return 4 * c * args.intermediate_size
    experts, k, inter = args.num_experts, args.num_experts_per_tok, args.moe_intermediate_size
    routing = (
        c * experts  # router logits, held in the output's Routing until the micro-batch ends
        + 4 * experts  # their fp32 softmax
        + 8 * k  # the top-k expert ids
        + 4 * k + 4 + c * k  # top-k weights, their sum, the renormalised weights the experts read
    )
    # gate / up pre-activations of the k routed copies of the token, and their sort order
    return routing + k * 2 * inter * c + 8 * k


def zero_centred_norm_bytes(width: int) -> int:
    """A zero-centred RMSNorm (the hybrid models') keeps its input in fp32 (or an fp32 copy), the fp32 normalised
    value the (1 + weight) product needs, and the rsqrt."""
    return 8 * width + 4


def hybrid_block_activation_bytes(args: ModelArgs, compute: Compute, layer: int) -> int:
    """Bytes per token one Qwen3-Next / Qwen3.5 block keeps for its backward (gspo_engine/model/qwen3_next.py).

    Its token mixer (gated attention or Gated DeltaNet), then its MLP: the dense one, or the routed
    experts plus the shared expert. Checked against what autograd saves in tests/test_qwen3_next_plan.py,
    but for the gated delta rule and the convolution, whose tensors are those flash-linear-attention's
    CUDA kernels keep (linear_attention_kernel_bytes).
    """
    hidden, c = args.hidden_size, compute.compute
    if args.is_linear_attention_layer(layer):
        mixer = linear_attention_bytes(args, compute) + linear_attention_kernel_bytes(args, compute)
    else:
        mixer = gated_attention_bytes(args, compute)
    moe = args.is_moe_layer(layer)
    mlp = compute.mlp_copies * c * hidden + mlp_bytes(args, compute, moe)  # the MLP's input, as its matmuls read it
    if moe:
        shared = args.shared_expert_intermediate_size
        mlp += (
            (3 * c * hidden if compute.autocast_copies else 0)  # the input cast for the gate and the shared gate / up
            + 4 * c * shared  # the shared expert's gate, silu(gate), up, their product
            + c + c * hidden  # sigmoid(shared gate) and the shared expert's output, which it scales
        )
    return 2 * zero_centred_norm_bytes(hidden) + mixer + mlp


def gated_attention_bytes(args: ModelArgs, compute: Compute) -> int:
    """The full-attention mixer of the hybrid models: Qwen3's attention with zero-centred q / k norms and a
    sigmoid output gate (q_proj gives [q | gate] per head)."""
    heads, kv_heads, head_dim, c = args.num_attention_heads, args.num_key_value_heads, args.head_dim, compute.compute
    query, key = heads * head_dim, kv_heads * head_dim
    # In fp32 the q norm reads a view of q_proj's output, whose gate half its storage keeps too.
    gate_half = 4 * query if c == 4 else 0
    return (
        compute.attention_copies * c * args.hidden_size  # the norm's output, as the q / k / v matmuls read it
        + 8 * (query + key) + 4 * (heads + kv_heads) + gate_half  # the zero-centred q and k norms
        + c * (query + 2 * key) + 4 * heads + c * query  # q, k, v as attention reads them, its log-sum-exp, output
        + 3 * c * query  # sigmoid(gate), the output reshaped, their product (o_proj's input)
    )


def linear_attention_bytes(args: ModelArgs, compute: Compute) -> int:
    """The Gated DeltaNet mixer (gspo_engine/model/gated_deltanet.py) around its two kernels: projection inputs,
    beta and the decay's softplus, the gated RMSNorm and out_proj's input."""
    c, hidden = compute.compute, args.hidden_size
    value_heads = args.linear_num_value_heads
    value_dim = value_heads * args.linear_value_head_dim
    projections = 2 if args.architecture == NEXT_ARCHITECTURE else 4  # qkvz, ba | qkv, z, b, a
    product = 4 if compute.residual == 4 else c  # weight * normalised: fp32 unless the weights are bf16
    return (
        c * hidden * (projections if compute.autocast_copies else 1)  # the norm's output, as the matmuls read it
        + c * value_heads + 8 * value_heads  # beta = sigmoid(b); softplus(a + dt_bias), its input and output
        + 4 * value_dim + 4 * value_heads  # the gated norm: the rule's output in fp32, the rsqrt
        + c * value_dim + product * value_dim  # the normalised output cast back, times the weight
        + 8 * value_dim  # silu(z) and z in fp32
        + c * value_dim  # out_proj's input
    )


def linear_attention_kernel_bytes(args: ModelArgs, compute: Compute) -> int:
    """What flash-linear-attention's convolution and chunked gated delta rule keep (fla-core 0.6.0, CUDA): the
    convolution's input and output (v is a view of the output), the l2-normalised q and k with their rsqrt, the
    decay's chunk-local cumulative sum and the [chunk] row per value head of the inverted chunk matrix A.
    Our CPU rule keeps more: it is not counted."""
    c = compute.compute
    key_dim = args.linear_num_key_heads * args.linear_key_head_dim
    conv_dim = 2 * key_dim + args.linear_num_value_heads * args.linear_value_head_dim
    return (
        2 * c * conv_dim
        + 2 * c * key_dim + 8 * args.linear_num_key_heads
        + 4 * args.linear_num_value_heads + c * args.linear_num_value_heads * DEFAULT_CHUNK_SIZE
    )


def gradient_bytes(args: ModelArgs, compute: Compute, moe: bool) -> int:
    """Bytes per token the backward of one block holds beyond what the block keeps: the fp32 gradient
    reaching the block, and the widest gradients of its MLP while they are formed (the tensors they
    replace are freed as the backward goes). For MoE layers: the buffers of the Triton experts
    backward (d gate_up [k, 2I], h [k, I], per-copy d x [k, H], the summed d x in fp32 and cast)."""
    hidden, c = args.hidden_size, compute.compute
    if not moe:
        return 4 * hidden + 2 * args.intermediate_size * c
    k, inter = args.num_experts_per_tok, args.moe_intermediate_size
    return 4 * hidden + k * (3 * inter + hidden) * c + (4 + c) * hidden


def no_grad_bytes(args: ModelArgs, compute: Compute, moe: bool) -> int:
    """Bytes per token a no-grad forward holds inside one block, where nothing is kept for a backward:
    the residual and the norm's output, then the larger of attention's intermediates and the MLP's
    (silu(gate), up and their product; for MoE the PyTorch experts path's gathered rows, gate / up,
    their product, the per-copy output and its fp32 sum: the Triton path holds less, k x (I + H))."""
    hidden, heads, kv_heads = args.hidden_size, args.num_attention_heads, args.num_key_value_heads
    head_dim, c = args.head_dim, compute.compute
    # the norm's output, q / k / v before and after their fp32 norms, the attention output
    attention = (compute.attention_copies * c * hidden + (heads + 2 * kv_heads) * head_dim * (c + 4)
                 + heads * head_dim * c)
    if not moe:
        mlp = compute.mlp_copies * c * hidden + 3 * args.intermediate_size * c
    else:
        k, inter, experts = args.num_experts_per_tok, args.moe_intermediate_size, args.num_experts
        mlp = compute.mlp_copies * c * hidden + k * (3 * inter + 2 * hidden) * c + 4 * hidden + (c + 4) * experts
    return compute.residual * hidden + max(attention, mlp)


def exchange_bytes(args: ModelArgs, compute: Compute) -> tuple[int, int, int]:
    """Bytes per token the expert-parallel exchange adds to a MoE layer (distributed/expert_parallel.py), as
    (kept for the backward, held in the backward, held by a no-grad forward).

    Kept: the k rows received for this rank's experts (the grouped experts' input), the k rows
    returned (the routing weights' gradient reads them), their sort order and local expert ids,
    and the routing weights gathered in sorted order. The backward sends the rows' gradients the
    same way: k rows out and k rows back. A no-grad forward holds, beyond the grouped experts' own
    working set (counted in no_grad_bytes), the rows received while the experts run on them, then the
    rows returned and weighted once the experts' buffers are freed: 2 x k rows. In expectation: a rank
    receives as many rows as it sends when the routing is balanced over the ranks; a skewed routing
    moves a rank's figure either way (tests/test_plan_expert_parallel.py).
    """
    k, hidden, c = args.num_experts_per_tok, args.hidden_size, compute.compute
    kept = 2 * k * c * hidden + 16 * k + c * k
    return kept, 2 * k * c * hidden, 2 * k * c * hidden


@dataclass(frozen=True)
class TokenBytes:
    """Bytes per padded token of a micro-batch, by what holds them."""

    blocks: int  # every block's saved tensors (no checkpointing)
    checkpointed: int  # every block's input (all checkpointing keeps)
    largest_block: int  # one block's saved tensors: recomputed in the backward under checkpointing
    gradients: int  # one block's backward, beyond its saved tensors
    no_grad: int  # one block of the no-grad scoring forward
    head: int  # the final norm and the hidden states the loss reads
    hidden_states: int  # the final hidden states alone (and their cast), what a no-grad forward returns
    batch: int  # ids, targets, masks, old / reference log-probs, replayed experts


def token_bytes(args: ModelArgs, compute: Compute, config: Config) -> TokenBytes:
    layers = [args.is_moe_layer(i) for i in range(args.num_hidden_layers)]
    if args.is_hybrid:
        per_block = [hybrid_block_activation_bytes(args, compute, i) for i in range(args.num_hidden_layers)]
    else:
        per_block = [block_activation_bytes(args, compute, moe) for moe in layers]
    gradients = [gradient_bytes(args, compute, moe) for moe in layers]
    no_grad = [no_grad_bytes(args, compute, moe) for moe in layers]
    if compute.sharded and config.distributed.expert_parallel > 1 and args.is_moe:
        kept, backward, forward = exchange_bytes(args, compute)
        per_block = [b + (kept if moe else 0) for b, moe in zip(per_block, layers)]
        gradients = [g + (backward if moe else 0) for g, moe in zip(gradients, layers)]
        no_grad = [n + (forward if moe else 0) for n, moe in zip(no_grad, layers)]
    hidden = args.hidden_size
    # The final norm's output is fp32 unless the weights are bf16; head_inputs casts it to bf16 under autocast.
    output = 2 if compute.residual == 2 else 4
    cast = compute.compute if compute.compute != output else 0
    batch = 8 + 8 + 1 + 1 + 4 + (4 if config.gspo.beta > 0 else 0)
    if config.model.routing_replay and args.is_moe:
        batch += 8 * args.num_experts_per_tok * len(args.moe_layers)
    return TokenBytes(
        blocks=sum(per_block),
        checkpointed=args.num_hidden_layers * compute.residual * hidden,
        largest_block=max(per_block),
        gradients=max(gradients),
        no_grad=max(no_grad),
        head=norm_bytes(hidden, compute.residual) + (output + cast) * hidden,
        hidden_states=(output + cast) * hidden,
        batch=batch,
    )

