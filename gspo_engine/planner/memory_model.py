"""The memory a GSPO step needs per GPU, phase by phase, as the trainer runs it: the rollout (weights
gathered for generation, KV cache, sampling), the no-grad scoring forward, and the update
(activations, the fused lm_head loss, the backward). docs/planner.md gives the formulas and compares
them with measured peaks. Units: the card is `gpu_memory_gb` decimal GB (80 is an 80 GB card); every
figure is bytes, printed as GiB (2**30 bytes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from gspo_engine.config import Config
from gspo_engine.distributed.rules import check_data_parallel, check_expert_parallel
from gspo_engine.model import ModelArgs, Qwen3Model
from gspo_engine.planner.activations import Compute, TokenBytes, resolve_compute, token_bytes
from gspo_engine.planner.vision import VisionPlan, prompts_in_micro_batch, vision_plan
from gspo_engine.model.kv_cache import slot_bytes
from gspo_engine.model.vision import tower_parts
from gspo_engine.rollout import PREFILL_TOKENS, kv_cache_slots
from gspo_kernels import DEFAULT_CHUNK_BUDGETS_MIB, STREAM_TILES

# The planned run is on GPUs: the fused loss's CUDA defaults.
CHUNK_BUDGET_MIB = DEFAULT_CHUNK_BUDGETS_MIB["cuda"]
TILE_ROWS, TILE_VOCAB = STREAM_TILES["cuda"]

GIB = 2**30
# What a card holds besides the tensors counted here: the CUDA context, NCCL's and cuBLAS's
# buffers (a fixed amount) and the caching allocator's fragmentation (a share of the card).
HEADROOM_FIXED_GIB = 2.0
HEADROOM_FRACTION = 0.05
# The largest micro-batch is searched in steps of this many tokens (the configs use multiples of it).
MICRO_BATCH_STEP = 1024
# sample_next's working set per logit [rows, V] on its PyTorch path: scaled logits and log-probs, and the
# int32 hashing behind the keyed uniforms (measured with tests/memory_tracker.py: 24 B). On CUDA the
# one-pass kernel (decoding/sampling_triton.py) needs none of it: an upper bound there.
SAMPLING_BYTES_PER_LOGIT = 24


@dataclass(frozen=True)
class ModelSizes:
    """Parameter counts of the parts the memory estimate treats differently."""

    total: int
    blocks: tuple[int, ...]  # per decoder block: one FSDP2 unit each; the root holds the rest
    matmul: int  # the weights autocast casts to bf16: every nn.Linear, and a tied lm_head
    layer_experts: int  # one MoE layer's grouped expert tensors (cast to bf16 one layer at a time)
    all_experts: int
    block_experts: tuple[int, ...] = ()  # per decoder block: its grouped expert tensors (0 for a dense block)
    tower: int = 0  # the vision tower's parameters (with its mergers)
    tower_units: tuple[int, ...] = ()  # its FSDP2 units (model.vision.tower_parts): blocks, mergers, the embeddings
    audio_tower: int = 0  # the audio encoder's (Qwen3-Omni), always frozen (build_models.configure)

    @property
    def largest_block(self) -> int:
        return max(self.blocks + self.tower_units)

    @property
    def root(self) -> int:
        return self.total - sum(self.blocks) - sum(self.tower_units)


def model_sizes(model: Qwen3Model, frozen_tower: bool = False) -> ModelSizes:
    """frozen_tower: autocast caches bf16 copies of trained weights only, so a frozen tower's linears have none."""
    args = model.args
    experts = sum(p.numel() for name, p in model.named_parameters() if name.endswith(("gate_up", "down")))
    visual, audio = getattr(model, "visual", None), getattr(model, "audio_tower", None)
    skipped = set(visual.modules()) if visual is not None and frozen_tower else set()
    if audio is not None:
        skipped |= set(audio.modules())
    matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear) and m not in skipped)
    if args.tie_word_embeddings:
        matmul += args.vocab_size * args.hidden_size  # the embedding, cast for the lm_head matmul
    units = []
    if visual is not None:
        inner = tower_parts(visual)[:-1]
        units = [sum(p.numel() for p in unit.parameters()) for unit in inner]
        units.append(sum(p.numel() for p in visual.parameters()) - sum(units))
    return ModelSizes(
        total=sum(p.numel() for p in model.parameters()),
        blocks=tuple(sum(p.numel() for p in block.parameters()) for block in model.layers),
        matmul=matmul,
        layer_experts=experts // max(1, len(args.moe_layers)),
        all_experts=experts,
        block_experts=tuple(sum(p.numel() for name, p in block.named_parameters() if name.endswith(("gate_up", "down")))
                            for block in model.layers),
        tower=sum(units),
        tower_units=tuple(units),
        audio_tower=sum(p.numel() for p in audio.parameters()) if audio is not None else 0,
    )


def expert_parallel_size(config: Config, gpus: int) -> int:
    """distributed.expert_parallel on several GPUs; one process holds every expert."""
    return config.distributed.expert_parallel if gpus > 1 else 1


def fsdp_sizes(sizes: ModelSizes, ep: int) -> ModelSizes:
    """What FSDP2 shards and gathers: every weight, or under expert parallelism every weight but the experts
    (distributed/expert_sharding.py), block by block."""
    if ep == 1 or not sizes.all_experts:
        return sizes
    experts = sizes.block_experts or (0,) * len(sizes.blocks)
    return ModelSizes(sizes.total - sizes.all_experts, tuple(b - e for b, e in zip(sizes.blocks, experts)),
                      sizes.matmul, 0, 0, (0,) * len(sizes.blocks), sizes.tower, sizes.tower_units, sizes.audio_tower)


def local_expert_casts(sizes: ModelSizes, compute: Compute, ep: int, saved: bool) -> float:
    """Under expert parallelism with bf16 compute, each MoE layer casts this GPU's fp32 experts (1/ep of them)
    for its forward: one layer's at a time, or all layers' when the casts stay saved for the backward."""
    if ep == 1 or compute.compute == 4:
        return 0.0
    return compute.compute * (sizes.all_experts if saved else sizes.layer_experts) / ep



@dataclass(frozen=True)
class Cluster:
    gpus: int = 1
    gpu_memory_gb: float = 80.0  # decimal GB, as cards are sold
    device: str = "GPU"  # what the run computes on: "GPU", or "CPU" with the host's memory

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
    images: float = 0.0  # the prompts' pixel values and image features, kept through the step (planner/vision.py)


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
    tower_activations: float = 0.0  # what a trained vision tower keeps for the micro-batch's images

    @property
    def activations(self) -> float:
        return self.activations_checkpointed if self.checkpointing else self.activations_full

    def peak(self, states: States) -> float:
        # Forward end: every kept activation and the fused loss; backward: the same activations
        # (less what is already freed) and one block's gradients. The larger of the two counts.
        return (states.weights + states.gradients + states.optimizer + states.reference + states.images
                + self.compute_weights + self.activations + self.tower_activations
                + max(self.fused_loss, self.backward + self.block_gradients))


@dataclass(frozen=True)
class Scoring:
    """The no-grad forward that recomputes old (and reference) log-probs, per micro-batch."""

    compute_weights: float  # FSDP2: the gathered blocks and their all-gather outputs (scoring_weights_bytes)
    working: float  # one block's tensors at a time, the residual stream, a streamed logits tile

    def peak(self, states: States) -> float:
        return (states.weights + states.optimizer + states.reference + states.images + self.compute_weights
                + self.working)


@dataclass(frozen=True)
class Rollout:
    """Generation: the gradients are freed, the weights are held whole for every decode step.

    The KV cache is a pool of `concurrency` slots of `columns` columns each (model/kv_cache.py): as
    many sequences decode at once, the others wait for a free slot (continuous batching).
    """

    sequences: int  # per GPU: its prompts x group_size
    columns: int  # KV cache columns per sequence: longest prompt + max_new_tokens - 1
    generation_weights: float  # FSDP2: every weight gathered in bf16; autocast: its bf16 copies
    kv_cache: float  # concurrency x slot_bytes
    sampling: float  # logits [rows, V] and sample_next's working set, the tokens and log-probs drawn
    prefill: float  # one prefill chunk's forward and its attention masks
    gather_output: float = 0.0  # FSDP2: the last block's all-gather output, before generation starts
    concurrency: int = 0  # sequences decoding at once: the slots the KV cache holds
    slot_bytes: float = 0.0  # one sequence's keys and values at `columns` columns
    budget_gb: float | None = None  # rollout.kv_cache_gb; None: the KV cache takes what the other terms leave
    max_new_tokens: int = 0

    @property
    def reduced(self) -> bool:
        """Fewer sequences decode at once than the rollout holds."""
        return self.concurrency < self.sequences

    @property
    def decode_steps(self) -> int:
        """Decode steps when every completion runs to max_new_tokens: one wave of `concurrency` after another."""
        return -(-self.sequences // max(1, self.concurrency)) * self.max_new_tokens

    @property
    def kv_cache_gb(self) -> float:
        """The budget that holds `concurrency` slots, in decimal GB: what a run passes to generate."""
        return self.budget_gb if self.budget_gb is not None else (self.concurrency + 0.5) * self.slot_bytes / 1e9

    def peak(self, states: States) -> float:
        # The gather's last all-gather output is freed before the first forward (a short rollout
        # of a large model peaks there, with every other weight already gathered).
        return (states.weights + states.optimizer + states.reference + states.images + self.generation_weights
                + max(self.kv_cache + max(self.sampling, self.prefill), self.gather_output))


def states_bytes(sizes: ModelSizes, config: Config, trainable: int, gpus: int, ep: int = 1, images: float = 0.0
                 ) -> States:
    """FSDP2 shards every weight over the GPUs; under expert parallelism the experts are split over the
    ep GPUs of a group instead (each holds 1/ep of them, and their AdamW states). Without LoRA every
    weight trains but a frozen vision tower (sizes.total - trainable): no gradients, no AdamW states."""
    if config.lora.rank:
        base = sizes.total - trainable
        weights = base * (2 if config.lora.base_bf16 else 4) + trainable * 4
        # The reference is the base with the adapters off: no copy.
        return States(weights, trainable * 4, trainable * 8, 0.0, "bf16" if config.lora.base_bf16 else "fp32",
                      images)
    per_gpu = sizes.total / gpus
    if ep > 1:
        per_gpu = (sizes.total - sizes.all_experts) / gpus + sizes.all_experts / ep
    trained = per_gpu - (sizes.total - trainable) / gpus
    reference = per_gpu * 4 if config.gspo.beta > 0 else 0.0
    return States(per_gpu * 4, trained * 4, trained * 8, reference, images=images)


def forward_weights_bytes(sizes: ModelSizes, compute: Compute, config: Config, experts_saved: bool,
                          ep: int = 1) -> float:
    """Compute weights held besides the fp32 master weights while a micro-batch runs.

    FSDP2 gathers one block and prefetches the next, and keeps the root (embedding, final norm,
    lm_head) gathered through the forward and backward; with distributed.reshard_after_forward off
    every block stays gathered. On one GPU under autocast, autocast caches a bf16 copy of every
    matmul weight until the forward ends, and each MoE layer casts its experts as it runs; those
    casts stay saved for the backward when `experts_saved` (no checkpointing). Under expert
    parallelism FSDP2 gathers every weight but the experts, which each MoE layer casts itself.
    """
    if compute.sharded:
        casts, sizes = local_expert_casts(sizes, compute, ep, experts_saved), fsdp_sizes(sizes, ep)
        if not config.distributed.reshard_after_forward:
            return sizes.total * compute.weights + casts
        return (2 * sizes.largest_block + sizes.root) * compute.weights + casts
    if not compute.autocast_copies:
        return 0.0
    matmul = 0 if config.lora.base_bf16 else sizes.matmul  # a bf16 base needs no cast
    return 2.0 * (matmul + (sizes.all_experts if experts_saved else sizes.layer_experts))


def scoring_weights_bytes(sizes: ModelSizes, compute: Compute, config: Config, ep: int = 1) -> float:
    """Compute weights held by the no-grad scoring forward.

    Under FSDP2, a forward frees a block's all-gather output (the flat buffer its weights are
    copied out of) only after the next block's weights are copied out of theirs: the previous
    output's AllGatherState is dropped when FSDPParamGroup.wait_for_unshard returns. So as each
    block starts, its weights, its all-gather output and the previous block's are held: 3 blocks
    and the root, or with reshard_after_forward off every weight gathered so far and 2 outputs
    (measured on 2 ranks by tests/test_plan_distributed.py). The update's forward holds the same,
    with fewer activations than its backward, whose 2 blocks and one block's gradients
    (training_bytes) weigh more.
    """
    if not compute.sharded:
        return forward_weights_bytes(sizes, compute, config, experts_saved=False)
    casts, sizes = local_expert_casts(sizes, compute, ep, saved=False), fsdp_sizes(sizes, ep)
    held = sizes.root + sizes.largest_block if config.distributed.reshard_after_forward else sizes.total
    return (held + 2 * sizes.largest_block) * compute.weights + casts


def generation_weights_bytes(sizes: ModelSizes, compute: Compute, config: Config, ep: int = 1) -> float:
    """Weights held for generation: FSDP2 gathers the whole model in the compute dtype for it (a decode
    step runs every block for one token), under expert parallelism every weight but the experts, of
    which each MoE layer casts this GPU's share as it runs; one GPU holds autocast's copies, as in a forward."""
    if compute.sharded:
        return fsdp_sizes(sizes, ep).total * compute.weights + local_expert_casts(sizes, compute, ep, saved=False)
    return forward_weights_bytes(sizes, compute, config, experts_saved=False)


@dataclass(frozen=True)
class MicroBatch:
    """A micro-batch as the trainer packs it at the longest sequences: whole sequences under the budget."""

    budget: int  # gspo.micro_batch_tokens
    sequences: int
    length: int  # the longest sequence: longest prompt + max_new_tokens - 1 (Sample.num_positions)
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
        + max(min(CHUNK_BUDGET_MIB * 2**20, response * vocab * 4),  # the logits kept, or
              min(TILE_ROWS, response) * min(TILE_VOCAB, vocab) * (4 + c))  # one streamed tile
        # d weight: in the weight's dtype, each vocabulary chunk summed in fp32 first (all logits
        # recomputed: one contribution per entry, see gspo_kernels.fused_linear._new_grads)
        + weight * vocab * hidden
        + (4 * min(TILE_VOCAB, vocab) * hidden if weight != 4 else 0)
        + 8 * tokens  # log-probs and the loss's per-token terms
    )


def training_bytes(args: ModelArgs, sizes: ModelSizes, compute: Compute, config: Config, per_token: TokenBytes,
                   micro: MicroBatch, ep: int = 1, vision: VisionPlan | None = None, prompts: int = 1) -> Training:
    """prompts: this GPU's prompts per step; a trained tower runs once per prompt a micro-batch holds."""
    tokens, checkpointing = micro.tokens, config.model.activation_checkpointing
    tower = 0.0
    if vision is not None:
        tower = vision.activation_bytes(prompts_in_micro_batch(micro.sequences, config.rollout.group_size, prompts))
    recompute = per_token.largest_block if checkpointing else 0
    return Training(
        micro=micro,
        compute_weights=forward_weights_bytes(sizes, compute, config, experts_saved=not checkpointing, ep=ep),
        block_gradients=fsdp_sizes(sizes, ep).largest_block * (compute.weights + 4) if compute.sharded else 0.0,
        activations_checkpointed=tokens * (per_token.checkpointed + per_token.head + per_token.batch),
        activations_full=tokens * (per_token.blocks + per_token.head + per_token.batch),
        checkpointing=checkpointing,
        fused_loss=fused_loss_bytes(args, compute, tokens, micro.sequences * micro.response),
        backward=tokens * (recompute + per_token.gradients),
        tower_activations=tower,
    )


def scoring_bytes(args: ModelArgs, sizes: ModelSizes, compute: Compute, config: Config, per_token: TokenBytes,
                  tokens: int, ep: int = 1) -> Scoring:
    # token_logprobs streams [rows, vocabulary] logits tiles: fp32, from a matmul in the compute dtype.
    matmul_out = compute.compute if compute.compute != 4 else 0
    tile = min(TILE_ROWS, tokens) * min(TILE_VOCAB, args.vocab_size) * (4 + matmul_out)
    working = tokens * (per_token.no_grad + per_token.hidden_states + per_token.batch) + tile
    return Scoring(scoring_weights_bytes(sizes, compute, config, ep), working)


def rollout_bytes(args: ModelArgs, sizes: ModelSizes, compute: Compute, config: Config, per_token: TokenBytes,
                  sequences: int, states: States, usable: float, ep: int = 1) -> Rollout:
    """The rollout at the concurrency rollout.kv_cache_gb allows, or without it at the most that fits `usable`."""
    rollout = config.rollout
    width = config.data.max_prompt_tokens
    columns = width + rollout.max_new_tokens - 1  # the last token drawn is never fed back
    slot_dtype = torch.bfloat16 if compute.compute == 2 else torch.float32
    per_slot = slot_bytes(args, columns, slot_dtype)
    groups = args.num_attention_heads // args.num_key_value_heads
    weights = generation_weights_bytes(sizes, compute, config, ep)
    # FSDP2 gathers the units one at a time, the blocks last: the last block's all-gather output
    # is held while its weights are copied out, with every other weight already gathered.
    gather_output = fsdp_sizes(sizes, ep).largest_block * compute.weights if compute.sharded else 0.0

    def at(concurrency: int) -> Rollout:
        # Logits and sample_next's working set for the slots decoding; tokens and log-probs for every sequence.
        sampling = concurrency * args.vocab_size * SAMPLING_BYTES_PER_LOGIT + sequences * rollout.max_new_tokens * 12
        chunk_rows = min(concurrency, max(1, PREFILL_TOKENS // width))
        prefill = (
            chunk_rows * width * per_token.no_grad
            # the bool mask, its copy expanded over the query heads of a kv head, and that as an additive bias
            + chunk_rows * width * width * (1 + groups * (1 + compute.compute))
        )
        return Rollout(sequences, columns, weights, concurrency * per_slot, sampling, prefill, gather_output,
                       concurrency, per_slot, rollout.kv_cache_gb, rollout.max_new_tokens)

    if rollout.kv_cache_gb is not None:
        return at(max(1, kv_cache_slots(args, sequences, columns, slot_dtype, rollout.kv_cache_gb, at_least_one=False)))
    # The rollout's peak grows with the concurrency: the largest that fits, by bisection (at least one).
    low, high = 1, sequences
    while low < high:
        middle = (low + high + 1) // 2
        if at(middle).peak(states) <= usable:
            low = middle
        else:
            high = middle - 1
    return at(low)


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
    expert_parallel: int = 1  # GPUs that split the experts between them (distributed.expert_parallel)
    vision: VisionPlan | None = None  # an image-text model's tower and visual tokens

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


def memory_plan(config: Config, args: ModelArgs, sizes: ModelSizes, trainable: int, cluster: Cluster) -> MemoryPlan:
    gpus = cluster.gpus
    check_data_parallel(config, gpus)  # a plan never shows a run that cannot start
    check_expert_parallel(config, gpus, args.num_experts, args.is_moe)
    ep = expert_parallel_size(config, gpus)
    compute = resolve_compute(config, gpus)
    per_token = token_bytes(args, compute, config)
    prompts = -(-config.rollout.prompts_per_step // gpus)
    sequences = prompts * config.rollout.group_size
    vision = None if args.vision is None else vision_plan(config, args.vision, sizes.tower, compute)
    states = states_bytes(sizes, config, trainable, gpus, ep, 0.0 if vision is None else vision.held_bytes(prompts))

    def training_at(budget: int) -> Training:
        micro = micro_batch_at(config, budget, sequences)
        return training_bytes(args, sizes, compute, config, per_token, micro, ep, vision, prompts)

    def fits(training: Training) -> bool:
        scoring = scoring_bytes(args, sizes, compute, config, per_token, training.micro.tokens, ep)
        return max(training.peak(states), scoring.peak(states)) <= cluster.usable_bytes

    configured = training_at(config.gspo.micro_batch_tokens)
    largest, whole = largest_micro_batch(training_at, fits)
    return MemoryPlan(
        cluster=cluster, compute=compute, states=states, training=configured,
        scoring=scoring_bytes(args, sizes, compute, config, per_token, configured.micro.tokens, ep),
        rollout=rollout_bytes(args, sizes, compute, config, per_token, sequences, states, cluster.usable_bytes, ep),
        expert_parallel=ep, vision=vision,
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

