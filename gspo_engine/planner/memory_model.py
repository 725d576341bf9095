"""`gspo-engine plan` and `train --dry-run`: what a config will do and the memory it needs per GPU,
from config.json alone (no weights are read).

Model shapes come from the model folder's config.json; when the folder is not on this machine
and its name is a released Qwen3 model, from that release's published config.json, so a plan can
be made before downloading anything.

The memory estimate follows the trainer phase by phase: the rollout (weights gathered for
generation, KV cache, sampling), the no-grad scoring forward, and the update (activations, the
fused lm_head loss, the backward). docs/planner.md gives the formulas and compares them with
peaks measured by gspo_engine.memory. Units: the card is `gpu_memory_gb` decimal GB (80 is an
80 GB card); every figure printed is GiB (2**30 bytes).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from gspo_engine.config import Config
from gspo_engine.lora import adapter_parameter_count
from gspo_engine.model import ModelArgs, Qwen3Model
from gspo_engine.rollout import PREFILL_TOKENS
from gspo_engine.tiny import TINY_MODELS, tiny_model_args
from gspo_kernels.fused_linear import DEFAULT_CHUNK_BUDGET_MIB
from gspo_kernels.fused_linear_stream import ROW_CHUNK, VOCAB_CHUNK

_QWEN3_VOCAB = 151936
_DENSE_4B = dict(
    architectures=["Qwen3ForCausalLM"], vocab_size=_QWEN3_VOCAB, hidden_size=2560, intermediate_size=9728,
    num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
    max_position_embeddings=40960, tie_word_embeddings=True, torch_dtype="bfloat16",
)
_MOE_30B = dict(
    architectures=["Qwen3MoeForCausalLM"], vocab_size=_QWEN3_VOCAB, hidden_size=2048, intermediate_size=6144,
    num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
    max_position_embeddings=40960, num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
    norm_topk_prob=True, torch_dtype="bfloat16",
)
# Shapes of released checkpoints, as their config.json files publish them.
RELEASED_SHAPES: dict[str, dict] = {
    "Qwen3-4B": _DENSE_4B,
    "Qwen3-4B-Instruct-2507": _DENSE_4B | {"max_position_embeddings": 262144},
    "Qwen3-30B-A3B": _MOE_30B,
    "Qwen3-Coder-30B-A3B-Instruct": _MOE_30B | {"max_position_embeddings": 262144},
    "Qwen3-235B-A22B": _MOE_30B | dict(
        hidden_size=4096, intermediate_size=12288, num_hidden_layers=94, num_attention_heads=64,
        moe_intermediate_size=1536,
    ),
}

GIB = 2**30
# What a card holds besides the tensors counted here: the CUDA context, NCCL's and cuBLAS's
# buffers (a fixed amount) and the caching allocator's fragmentation (a share of the card).
HEADROOM_FIXED_GIB = 2.0
HEADROOM_FRACTION = 0.05
# The largest micro-batch is searched in steps of this many tokens (the configs use multiples of it).
MICRO_BATCH_STEP = 1024
# sample_next's working set per logit [rows, V]: fp32 logits, scaled logits and log-probs, and the
# int64 hashing behind the keyed uniforms (measured with gspo_engine.memory: 52 B).
SAMPLING_BYTES_PER_LOGIT = 52


# ---------------------------------------------------------------------------------------- shapes
def plan_model_args(name_or_path: str) -> tuple[ModelArgs, str]:
    if name_or_path in TINY_MODELS:
        return tiny_model_args(name_or_path), f"{name_or_path} (embedded, random)"
    folder = Path(name_or_path)
    if (folder / "config.json").is_file():
        return ModelArgs.from_hf_config(json.loads((folder / "config.json").read_text())), str(folder)
    if folder.name in RELEASED_SHAPES:
        return ModelArgs.from_hf_config(RELEASED_SHAPES[folder.name]), (
            f"{folder} (not on this machine: shapes of the released {folder.name})"
        )
    raise ValueError(
        f"model.name_or_path: {name_or_path} has no config.json and is not a released model this planner knows "
        f"({', '.join(RELEASED_SHAPES)}) nor an embedded one ({', '.join(TINY_MODELS)})"
    )


@dataclass(frozen=True)
class ModelSizes:
    """Parameter counts of the parts the memory estimate treats differently."""

    total: int
    blocks: tuple[int, ...]  # per decoder block: one FSDP2 unit each; the root holds the rest
    matmul: int  # the weights autocast casts to bf16: every nn.Linear, and a tied lm_head
    layer_experts: int  # one MoE layer's grouped expert tensors (cast to bf16 one layer at a time)
    all_experts: int

    @property
    def largest_block(self) -> int:
        return max(self.blocks)

    @property
    def root(self) -> int:
        return self.total - sum(self.blocks)


def model_sizes(model: Qwen3Model) -> ModelSizes:
    args = model.args
    experts = sum(p.numel() for name, p in model.named_parameters() if name.endswith(("gate_up", "down")))
    matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    if args.tie_word_embeddings:
        matmul += args.vocab_size * args.hidden_size  # the embedding, cast for the lm_head matmul
    return ModelSizes(
        total=sum(p.numel() for p in model.parameters()),
        blocks=tuple(sum(p.numel() for p in block.parameters()) for block in model.layers),
        matmul=matmul,
        layer_experts=experts // max(1, len(args.moe_layers)),
        all_experts=experts,
    )


# ---------------------------------------------------------------------------------------- dtypes
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


# --------------------------------------------------------------------------- activations per token
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
    if not moe:
        return attention + 4 * c * args.intermediate_size  # gate, silu(gate), up, their product
    experts, k, inter = args.num_experts, args.num_experts_per_tok, args.moe_intermediate_size
    routing = (
        c * experts  # router logits, held in the output's Routing until the micro-batch ends
        + 4 * experts  # their fp32 softmax
        + 8 * k  # the top-k expert ids
        + 4 * k + 4 + c * k  # top-k weights, their sum, the renormalised weights the experts read
    )
    # gate / up pre-activations of the k routed copies of the token, and their sort order
    return attention + routing + k * 2 * inter * c + 8 * k


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
    per_block = [block_activation_bytes(args, compute, moe) for moe in layers]
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
        gradients=max(gradient_bytes(args, compute, moe) for moe in layers),
        no_grad=max(no_grad_bytes(args, compute, moe) for moe in layers),
        head=norm_bytes(hidden, compute.residual) + (output + cast) * hidden,
        hidden_states=(output + cast) * hidden,
        batch=batch,
    )


# ---------------------------------------------------------------------------------------- phases
@dataclass(frozen=True)
class Cluster:
    gpus: int = 1
    gpu_memory_gb: float = 80.0  # decimal GB, as cards are sold

    def __post_init__(self):
        if not isinstance(self.gpus, int) or self.gpus < 1:
            raise ValueError(f"--gpus: {self.gpus!r} is not valid; expected an integer >= 1")
        if not self.gpu_memory_gb > 0:
            raise ValueError(f"--gpu-memory-gb: {self.gpu_memory_gb!r} is not valid; expected a number > 0")

    @property
    def capacity_bytes(self) -> float:
        return self.gpu_memory_gb * 1e9

    @property
    def usable_bytes(self) -> float:
        return self.capacity_bytes * (1 - HEADROOM_FRACTION) - HEADROOM_FIXED_GIB * GIB


@dataclass(frozen=True)
class States:
    """Bytes per GPU that live through the whole run: sharded evenly over the GPUs by FSDP2."""

    weights: float  # fp32 master weights (LoRA: the frozen base and the adapters)
    gradients: float  # of what is trained, fp32; freed after each optimizer step
    optimizer: float  # AdamW exp_avg and exp_avg_sq, fp32
    reference: float  # the KL reference model (gspo.beta > 0), fp32
    lora_base: str = ""  # the frozen base's dtype under LoRA


@dataclass(frozen=True)
class Training:
    """One micro-batch's forward and backward, in bytes per GPU on top of the states."""

    micro: MicroBatch
    compute_weights: float  # unsharded bf16 weights (FSDP2) or autocast's bf16 copies
    block_gradients: float  # FSDP2: one block's unsharded gradients before their reduce-scatter
    activations_checkpointed: float
    activations_full: float
    checkpointing: bool  # which of the two the config runs
    fused_loss: float  # gspo_kernels.fused_linear working set
    backward: float  # one block's backward beyond what it keeps, and its recompute under checkpointing

    @property
    def activations(self) -> float:
        return self.activations_checkpointed if self.checkpointing else self.activations_full

    def peak(self, states: States) -> float:
        # Forward end: every kept activation and the fused loss; backward: the same activations
        # (less what is already freed) and one block's gradients. The larger of the two counts.
        return (states.weights + states.gradients + states.optimizer + states.reference + self.compute_weights
                + self.activations + max(self.fused_loss, self.backward + self.block_gradients))


@dataclass(frozen=True)
class Scoring:
    """The no-grad forward that recomputes old (and reference) log-probs, per micro-batch."""

    compute_weights: float  # FSDP2: the gathered blocks and their all-gather outputs (scoring_weights_bytes)
    working: float  # one block's tensors at a time, the residual stream, a streamed logits tile

    def peak(self, states: States) -> float:
        return states.weights + states.optimizer + states.reference + self.compute_weights + self.working


@dataclass(frozen=True)
class Rollout:
    """Generation: the gradients are freed, the weights are held whole for every decode step."""

    sequences: int  # per GPU: its prompts x group_size
    columns: int  # KV cache columns per sequence: longest prompt + max_new_tokens - 1
    generation_weights: float  # FSDP2: every weight gathered in bf16; autocast: its bf16 copies
    kv_cache: float
    sampling: float  # logits [rows, V] and sample_next's working set, the tokens and log-probs drawn
    prefill: float  # one prefill chunk's forward and its attention masks
    gather_output: float = 0.0  # FSDP2: the last block's all-gather output, before generation starts

    def peak(self, states: States) -> float:
        # The gather's last all-gather output is freed before the first forward (a short rollout
        # of a large model peaks there, with every other weight already gathered).
        return (states.weights + states.optimizer + states.reference + self.generation_weights
                + max(self.kv_cache + max(self.sampling, self.prefill), self.gather_output))


def states_bytes(sizes: ModelSizes, config: Config, trainable: int, gpus: int) -> States:
    if config.lora.rank:
        base = sizes.total - trainable
        weights = base * (2 if config.lora.base_bf16 else 4) + trainable * 4
        # The reference is the base with the adapters off: no copy.
        return States(weights, trainable * 4, trainable * 8, 0.0, "bf16" if config.lora.base_bf16 else "fp32")
    reference = sizes.total * 4 / gpus if config.gspo.beta > 0 else 0.0
    return States(sizes.total * 4 / gpus, sizes.total * 4 / gpus, sizes.total * 8 / gpus, reference)


def forward_weights_bytes(sizes: ModelSizes, compute: Compute, config: Config, experts_saved: bool) -> float:
    """Compute weights held besides the fp32 master weights while a micro-batch runs.

    FSDP2 gathers one block and prefetches the next, and keeps the root (embedding, final norm,
    lm_head) gathered through the forward and backward; with distributed.reshard_after_forward off
    every block stays gathered. On one GPU under autocast, autocast caches a bf16 copy of every
    matmul weight until the forward ends, and each MoE layer casts its experts as it runs; those
    casts stay saved for the backward when `experts_saved` (no checkpointing).
    """
    if compute.sharded:
        if not config.distributed.reshard_after_forward:
            return sizes.total * compute.weights
        return (2 * sizes.largest_block + sizes.root) * compute.weights
    if not compute.autocast_copies:
        return 0.0
    matmul = 0 if config.lora.base_bf16 else sizes.matmul  # a bf16 base needs no cast
    return 2.0 * (matmul + (sizes.all_experts if experts_saved else sizes.layer_experts))


def scoring_weights_bytes(sizes: ModelSizes, compute: Compute, config: Config) -> float:
    """Compute weights held by the no-grad scoring forward.

    Under FSDP2, a forward frees a block's all-gather output (the flat buffer its weights are
    copied out of) only after the next block's weights are copied out of theirs: the previous
    output's AllGatherState is dropped when FSDPParamGroup.wait_for_unshard returns. So as each
    block starts, its weights, its all-gather output and the previous block's are held: 3 blocks
    and the root, or with reshard_after_forward off every weight gathered so far and 2 outputs
    (measured on 2 ranks by tests/test_plan_distributed.py; the 2 blocks the backward holds, which
    this phase used to count, left one out). The update's forward holds the same, with fewer
    activations than its backward, whose 2 blocks and one block's gradients (training_bytes) weigh more.
    """
    if not compute.sharded:
        return forward_weights_bytes(sizes, compute, config, experts_saved=False)
    held = sizes.root + sizes.largest_block if config.distributed.reshard_after_forward else sizes.total
    return (held + 2 * sizes.largest_block) * compute.weights


def generation_weights_bytes(sizes: ModelSizes, compute: Compute, config: Config) -> float:
    """Weights held for generation: FSDP2 gathers the whole model in the compute dtype for it (a decode
    step runs every block for one token); one GPU holds autocast's copies, as in a forward."""
    if compute.sharded:
        return sizes.total * compute.weights
    return forward_weights_bytes(sizes, compute, config, experts_saved=False)


@dataclass(frozen=True)
class MicroBatch:
    """A micro-batch as the trainer packs it at the longest sequences: whole sequences under the budget."""

    budget: int  # gspo.micro_batch_tokens
    sequences: int
    length: int  # padded length of each: longest prompt + max_new_tokens - 1 (Sample.length)
    response: int  # completion tokens of each

    @property
    def tokens(self) -> int:
        return self.sequences * self.length


def micro_batch_at(config: Config, budget: int, sequences_per_gpu: int) -> MicroBatch:
    length = config.data.max_prompt_tokens + config.rollout.max_new_tokens - 1
    per_minibatch = -(-sequences_per_gpu // config.gspo.num_minibatches)
    # split_micro_batches: as many sequences as fit the budget, at least one, at most the minibatch.
    sequences = min(max(1, budget // length), per_minibatch)
    return MicroBatch(budget, sequences, length, config.rollout.max_new_tokens)


def fused_loss_bytes(args: ModelArgs, compute: Compute, tokens: int, response: int) -> int:
    """gspo_kernels.fused_linear_gspo_loss's working set: d hidden and d weight are formed in its forward."""
    hidden, vocab, c = args.hidden_size, args.vocab_size, compute.compute
    weight = compute.weights if compute.sharded else c  # the lm_head weight as the loss reads it
    return (
        4 * tokens * hidden  # d hidden, accumulated in fp32
        + (c if c != 4 else 0) * tokens * hidden  # ... cast to the hidden states' dtype for the backward
        + response * hidden * (c + 4)  # the response rows gathered, and their fp32 gradient
        + min(DEFAULT_CHUNK_BUDGET_MIB * 2**20, response * vocab * 4)  # the logits kept (or streamed tiles)
        + 4 * vocab * hidden  # d weight, accumulated in fp32
        + (weight if weight != 4 else 0) * vocab * hidden  # ... cast to the weight's dtype
        + 8 * tokens  # log-probs and the loss's per-token terms
    )


def training_bytes(args: ModelArgs, sizes: ModelSizes, compute: Compute, config: Config, per_token: TokenBytes,
                   micro: MicroBatch) -> Training:
    tokens, checkpointing = micro.tokens, config.model.activation_checkpointing
    recompute = per_token.largest_block if checkpointing else 0
    return Training(
        micro=micro,
        compute_weights=forward_weights_bytes(sizes, compute, config, experts_saved=not checkpointing),
        block_gradients=sizes.largest_block * (compute.weights + 4) if compute.sharded else 0.0,
        activations_checkpointed=tokens * (per_token.checkpointed + per_token.head + per_token.batch),
        activations_full=tokens * (per_token.blocks + per_token.head + per_token.batch),
        checkpointing=checkpointing,
        fused_loss=fused_loss_bytes(args, compute, tokens, micro.sequences * micro.response),
        backward=tokens * (recompute + per_token.gradients),
    )


def scoring_bytes(args: ModelArgs, sizes: ModelSizes, compute: Compute, config: Config, per_token: TokenBytes,
                  tokens: int) -> Scoring:
    # token_logprobs streams [rows, vocabulary] logits tiles: fp32, from a matmul in the compute dtype.
    matmul_out = compute.compute if compute.compute != 4 else 0
    tile = min(ROW_CHUNK, tokens) * min(VOCAB_CHUNK, args.vocab_size) * (4 + matmul_out)
    working = tokens * (per_token.no_grad + per_token.hidden_states + per_token.batch) + tile
    return Scoring(scoring_weights_bytes(sizes, compute, config), working)


def rollout_bytes(args: ModelArgs, sizes: ModelSizes, compute: Compute, config: Config, per_token: TokenBytes,
                  sequences: int) -> Rollout:
    rollout = config.rollout
    width = config.data.max_prompt_tokens
    columns = width + rollout.max_new_tokens - 1  # KVCache.allocate: the last token drawn is never fed back
    kv_cache = (2 * args.num_hidden_layers * sequences * args.num_key_value_heads * args.head_dim * columns
                * compute.compute + sequences * columns)  # keys and values per layer, and the bool key mask
    sampling = sequences * args.vocab_size * SAMPLING_BYTES_PER_LOGIT + sequences * rollout.max_new_tokens * 12
    chunk_rows = min(sequences, max(1, PREFILL_TOKENS // width))
    groups = args.num_attention_heads // args.num_key_value_heads
    prefill = (
        chunk_rows * width * per_token.no_grad
        # the bool mask, its copy expanded over the query heads of a kv head, and that as an additive bias
        + chunk_rows * width * width * (1 + groups * (1 + compute.compute))
    )
    weights = generation_weights_bytes(sizes, compute, config)
    # FSDP2 gathers the units one at a time, the blocks last: the last block's all-gather output
    # is held while its weights are copied out, with every other weight already gathered.
    gather_output = sizes.largest_block * compute.weights if compute.sharded else 0.0
    return Rollout(sequences, columns, weights, kv_cache, sampling, prefill, gather_output)


# ----------------------------------------------------------------------------------------- plans
@dataclass
class MemoryPlan:
    """Bytes per GPU, phase by phase, on `cluster`; the peak is the larger phase."""

    cluster: Cluster
    compute: Compute
    states: States
    training: Training  # at the configured micro_batch_tokens
    scoring: Scoring
    rollout: Rollout
    largest: Training | None  # the largest micro-batch whose training phase fits; None if not even one sequence
    largest_is_whole_minibatch: bool  # then a larger budget changes nothing

    @property
    def usable(self) -> float:
        return self.cluster.usable_bytes

    @property
    def training_peak(self) -> float:
        return max(self.training.peak(self.states), self.scoring.peak(self.states))

    @property
    def rollout_peak(self) -> float:
        return self.rollout.peak(self.states)

    @property
    def peak(self) -> float:
        return max(self.training_peak, self.rollout_peak)

    @property
    def training_fits(self) -> bool:
        return self.training_peak <= self.usable

    @property
    def rollout_fits(self) -> bool:
        return self.rollout_peak <= self.usable

    def lines(self) -> list[str]:
        cluster, states, training, rollout = self.cluster, self.states, self.training, self.rollout
        micro = training.micro
        sharded = f", 1/{cluster.gpus} each" if cluster.gpus > 1 else ""
        lines = [
            f"memory per GPU: {cluster.gpus} x {cluster.gpu_memory_gb:g} GB = {cluster.capacity_bytes / GIB:.2f} GiB "
            f"each, {self.usable / GIB:.2f} GiB planned ({HEADROOM_FIXED_GIB:g} GiB + {HEADROOM_FRACTION:.0%} left "
            "for the CUDA context and allocator fragmentation)",
            f"  precision: {self.compute.label}",
            _row(f"  frozen {states.lora_base} base weights + fp32 adapters" if states.lora_base
                 else f"  weights (fp32{sharded})", states.weights),
            _row(f"  gradients (fp32{sharded}; freed after each update)", states.gradients),
            _row(f"  AdamW exp_avg + exp_avg_sq (fp32{sharded})", states.optimizer),
        ]
        if states.reference:
            lines.append(_row(f"  reference model for the KL (fp32{sharded})", states.reference))
        lines += [
            f"  training, micro_batch_tokens {micro.budget:,}: {micro.sequences} sequences of {micro.length:,} tokens "
            f"({micro.tokens:,} padded) per micro-batch",
            _row("    " + self._compute_weights_label(), training.compute_weights),
        ]
        if training.block_gradients:
            lines.append(_row("    one block's unsharded gradients + fp32 reduce-scatter input",
                              training.block_gradients))
        lines += [
            _row("    activations with checkpointing" + _configured(training.checkpointing),
                 training.activations_checkpointed),
            _row("    activations without checkpointing" + _configured(not training.checkpointing),
                 training.activations_full),
            _row(f"    fused lm_head loss working set (chunk budget {DEFAULT_CHUNK_BUDGET_MIB} MiB)",
                 training.fused_loss),
            _row("    backward of one block" + (", recomputed" if training.checkpointing else ""), training.backward),
            _verdict("    training peak (the larger of loss and backward counts)", training.peak(states),
                     self.usable),
            _row("  old log-prob scoring forward (no grad): peak", self.scoring.peak(states)),
            f"  rollout: {rollout.sequences} sequences per GPU, {rollout.columns:,} KV cache columns each",
            _row("    " + self._generation_weights_label(), rollout.generation_weights),
            _row("    KV cache", rollout.kv_cache),
            _row("    sampling: logits and their working set", rollout.sampling),
            _row("    prefill: one chunk's forward and attention masks", rollout.prefill),
            *([_row("    the gather's last all-gather output (before generation)", rollout.gather_output)]
              if rollout.gather_output else []),
            _verdict("    rollout peak (gradients freed)", self.rollout_peak, self.usable),
            self._micro_batch_line(),
        ]
        if not self.rollout_fits:
            lines += self._rollout_advice()
        return lines

    def _compute_weights_label(self) -> str:
        if self.compute.sharded:
            return f"unsharded {'bf16' if self.compute.weights == 2 else 'fp32'} weights: 2 blocks + the root"
        if self.compute.autocast_copies:
            return "bf16 weight copies (autocast's cache, the experts' casts)"
        return "compute weights: the fp32 weights themselves"

    def _generation_weights_label(self) -> str:
        if self.compute.sharded:
            return f"every weight gathered in {'bf16' if self.compute.weights == 2 else 'fp32'} for generation"
        if self.compute.autocast_copies:
            return "bf16 weight copies (autocast's cache)"
        return "weights for generation: the fp32 weights themselves"

    def _micro_batch_line(self) -> str:
        verdict = "fits" if self.training_fits else "does not fit"
        configured = f"the configured {self.training.micro.budget:,} {verdict}"
        if self.largest is None:
            return (f"  largest micro-batch that fits: none, not even one sequence of {self.training.micro.length:,} "
                    f"tokens; {configured}")
        best = self.largest.micro
        whole = ", the whole minibatch" if self.largest_is_whole_minibatch else ""
        return (f"  largest micro-batch that fits: micro_batch_tokens {best.budget:,} (searched in multiples of "
                f"{MICRO_BATCH_STEP}): {best.sequences} sequences, {best.tokens:,} padded tokens{whole}; {configured}")

    def _rollout_advice(self) -> list[str]:
        held = self.states.weights + self.states.optimizer + self.states.reference
        rollout = self.rollout
        generating = rollout.kv_cache + max(rollout.sampling, rollout.prefill)
        if rollout.gather_output > generating:
            working = f"{_gib(rollout.gather_output)} of the gather's last all-gather output"
        else:
            working = (f"{_gib(rollout.kv_cache)} of KV cache + {_gib(max(rollout.sampling, rollout.prefill))} of "
                       "sampling / prefill")
        lines = [
            f"  the rollout phase does not fit: {_gib(held)} of weights and AdamW states + "
            f"{_gib(rollout.generation_weights)} of weights for generation + {working} = {_gib(self.rollout_peak)}, "
            f"{_gib(self.rollout_peak - self.usable)} more than {_gib(self.usable)}",
        ]
        if self.compute.sharded:
            lines.append("  every GPU holds the whole model while it generates: expert-parallel rollouts (each GPU "
                         "keeps its share of the experts, docs/scaling.md) are the way out; fewer prompts per step "
                         "only shrink the KV cache")
        else:
            lines.append("  fewer prompts per step or shorter completions shrink the KV cache; more GPUs shard the "
                         "states")
        return lines


@dataclass
class Plan:
    model_source: str
    architecture: str
    total_params: int
    active_params: int  # per token: shared weights plus top-k experts
    tokens_per_step: int  # prompts x group x (prompt + completion), at the configured maxima
    sequences_per_minibatch: int
    train_memory_gib: float  # weights + gradients + AdamW states of what is trained, fp32 master copy, all GPUs
    trainable_params: int  # all of them, or the LoRA adapters'
    lora_rank: int = 0
    base_dtype: str = "fp32"  # of the frozen base weights under LoRA
    memory: MemoryPlan | None = None

    def lines(self) -> list[str]:
        lines = [
            f"model: {self.model_source} ({self.architecture})",
            f"parameters: {_count(self.total_params)} total, {_count(self.active_params)} active per token",
        ]
        if self.lora_rank:
            share = self.trainable_params / self.total_params
            lines.append(f"trained: LoRA rank {self.lora_rank}, {_count(self.trainable_params)} adapter "
                         f"parameters ({share:.2%} of the model)")
        lines += [
            f"tokens per step (at most): {self.tokens_per_step:,}",
            f"sequences per minibatch: {self.sequences_per_minibatch}",
        ]
        if self.lora_rank:
            lines.append(f"frozen {self.base_dtype} base weights + adapters, their gradients and AdamW states: "
                         f"{self.train_memory_gib:.2f} GiB (before activations and the KV cache)")
        else:
            lines.append(f"weights + gradients + AdamW states: {self.train_memory_gib:.2f} GiB "
                         "(fp32 master weights, all GPUs together, before activations and the KV cache)")
        if self.memory is not None:
            lines += self.memory.lines()
        return lines


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def _row(label: str, n: float) -> str:
    return f"{label + ':':<66} {n / GIB:>8.2f} GiB"


def _configured(chosen: bool) -> str:
    return " (configured)" if chosen else ""


def _verdict(label: str, peak: float, usable: float) -> str:
    verdict = "fits" if peak <= usable else f"DOES NOT FIT ({_gib(peak - usable)} over)"
    return f"{_row(label, peak)} of {usable / GIB:.2f}: {verdict}"


def check_data_parallel(config: Config, gpus: int) -> None:
    """The trainer's own conditions for a run over several GPUs, so a plan never shows one that cannot start."""
    if gpus == 1:
        return
    if config.lora.rank:
        raise ValueError(f"--gpus {gpus}: LoRA runs on one GPU (distributed runs reject lora.rank > 0); plan it "
                         "with --gpus 1")
    prompts = config.rollout.prompts_per_step
    if prompts % gpus:
        raise ValueError(f"--gpus {gpus}: rollout.prompts_per_step ({prompts}) must be a multiple of the number of "
                         "GPUs (each samples all completions of its own prompts)")
    if prompts // gpus * config.rollout.group_size < config.gspo.num_minibatches:
        raise ValueError(f"--gpus {gpus}: each GPU holds {prompts // gpus * config.rollout.group_size} completions, "
                         f"fewer than gspo.num_minibatches ({config.gspo.num_minibatches})")


def memory_plan(config: Config, args: ModelArgs, sizes: ModelSizes, trainable: int, cluster: Cluster) -> MemoryPlan:
    gpus = cluster.gpus
    check_data_parallel(config, gpus)
    compute = resolve_compute(config, gpus)
    per_token = token_bytes(args, compute, config)
    states = states_bytes(sizes, config, trainable, gpus)
    sequences = -(-config.rollout.prompts_per_step // gpus) * config.rollout.group_size

    def training_at(budget: int) -> Training:
        return training_bytes(args, sizes, compute, config, per_token, micro_batch_at(config, budget, sequences))

    def fits(training: Training) -> bool:
        scoring = scoring_bytes(args, sizes, compute, config, per_token, training.micro.tokens)
        return max(training.peak(states), scoring.peak(states)) <= cluster.usable_bytes

    configured = training_at(config.gspo.micro_batch_tokens)
    largest, whole = largest_micro_batch(training_at, fits)
    return MemoryPlan(
        cluster=cluster, compute=compute, states=states, training=configured,
        scoring=scoring_bytes(args, sizes, compute, config, per_token, configured.micro.tokens),
        rollout=rollout_bytes(args, sizes, compute, config, per_token, sequences),
        largest=largest, largest_is_whole_minibatch=whole,
    )


def largest_micro_batch(training_at, fits) -> tuple[Training | None, bool]:
    """The largest micro_batch_tokens, a multiple of MICRO_BATCH_STEP, whose training phase fits.

    Memory grows with the padded tokens, which grow with the budget until the whole minibatch is
    one micro-batch: a bisection over the multiples up to that one.
    """
    whole = training_at(2**62).micro
    high = -(-whole.tokens // MICRO_BATCH_STEP)  # the first multiple that holds the whole minibatch
    if not fits(training_at(MICRO_BATCH_STEP)):
        return None, False
    low = 1
    while low < high:
        middle = (low + high + 1) // 2
        if fits(training_at(middle * MICRO_BATCH_STEP)):
            low = middle
        else:
            high = middle - 1
    best = training_at(low * MICRO_BATCH_STEP)
    return best, best.micro.sequences == whole.sequences


def make_plan(config: Config, gpus: int = 1, gpu_memory_gb: float = 80.0) -> Plan:
    cluster = Cluster(gpus, gpu_memory_gb)
    args, source = plan_model_args(config.model.name_or_path)
    with torch.device("meta"):
        model = Qwen3Model(args)
    total = sum(p.numel() for p in model.parameters())
    expert_params = sum(p.numel() for n, p in model.named_parameters() if n.endswith(("gate_up", "down")))
    active = total - expert_params
    if args.is_moe:
        active += expert_params * args.num_experts_per_tok // args.num_experts
    rollout = config.rollout
    sequences = rollout.prompts_per_step * rollout.group_size
    tokens = sequences * (config.data.max_prompt_tokens + rollout.max_new_tokens)
    per_minibatch = -(-sequences // config.gspo.num_minibatches)
    sizes = model_sizes(model)
    if not config.lora.rank:
        # fp32 weights (4 B) + fp32 gradients (4 B) + AdamW exp_avg and exp_avg_sq (8 B) per trained parameter.
        memory = memory_plan(config, args, sizes, total, cluster)
        return Plan(source, args.architecture, total, active, tokens, per_minibatch, total * 16 / GIB, total,
                    memory=memory)
    # LoRA: gradients and optimizer states for the adapters only; the base is stored, not trained.
    adapters = adapter_parameter_count(model, config.lora)
    sizes = ModelSizes(total + adapters, sizes.blocks, sizes.matmul, sizes.layer_experts, sizes.all_experts)
    base_bytes = 2 if config.lora.base_bf16 else 4
    memory = memory_plan(config, args, sizes, adapters, cluster)
    return Plan(source, args.architecture, total + adapters, active, tokens, per_minibatch,
                (total * base_bytes + adapters * 16) / GIB, adapters, config.lora.rank,
                "bf16" if config.lora.base_bf16 else "fp32", memory=memory)
