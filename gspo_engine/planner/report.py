"""The Plan that make_plan returns, and its text as `gspo-engine plan` and `train --dry-run` print it: what
the config will do, then the memory per GPU phase by phase, in GiB, with a verdict for each phase and
advice when one does not fit.
"""

from __future__ import annotations

from dataclasses import dataclass

from gspo_engine.planner.activations import Compute
from gspo_engine.planner.memory_model import (
    GIB,
    HEADROOM_FIXED_GIB,
    HEADROOM_FRACTION,
    MICRO_BATCH_STEP,
    TILE_ROWS,
    TILE_VOCAB,
    MemoryPlan,
    Rollout,
)
from gspo_engine.planner.vision import VisionPlan

@dataclass
class Plan:
    """What a config will do, as make_plan (plan.py) finds it, and the memory it needs per GPU."""

    model_source: str
    architecture: str
    total_params: int
    active_params: int  # per token: shared weights plus top-k experts
    tokens_per_step: int  # prompts x group x (prompt + completion), at the configured maxima
    sequences_per_minibatch: int
    train_memory_gib: float  # weights + gradients + AdamW states of what is trained, fp32 master copy, all GPUs
    trainable_params: int  # all of them, or the LoRA adapters' and the lora.modules_to_save copies'
    lora_rank: int = 0
    base_dtype: str = "fp32"  # of the frozen base weights under LoRA
    memory: MemoryPlan | None = None

    def lines(self) -> list[str]:
        """The plan as `gspo-engine plan` prints it."""
        lines = [
            f"model: {self.model_source} ({self.architecture})",
            f"parameters: {_count(self.total_params)} total, {_count(self.active_params)} active per token",
        ]
        if self.lora_rank:
            share = self.trainable_params / self.total_params
            lines.append(f"trained: LoRA rank {self.lora_rank}, {_count(self.trainable_params)} trained "
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
        if self.memory is not None and self.memory.vision is not None:
            lines += vision_lines(self.memory.vision, self.lora_rank, self.base_dtype)
        if self.memory is not None:
            lines += memory_lines(self.memory)
        return lines


def vision_lines(vision: VisionPlan, lora_rank: int, base_dtype: str) -> list[str]:
    """The tower's parameters and whether they train, and the visual tokens an image and a prompt bring."""
    size = _count(vision.parameters)
    if lora_rank:
        held = f"a frozen {base_dtype} base under LoRA" + (", adapted (lora.targets name its blocks' linears)"
                                                           if vision.trained else "")
    elif vision.trained:
        held = (f"trained (model.freeze_vision_tower false): {_gib(vision.parameters * 16)} of fp32 weights, "
                "gradients and AdamW states")
    else:
        held = (f"frozen (model.freeze_vision_tower): {_gib(vision.parameters * 4)} of fp32 weights, no gradients "
                "or AdamW states; its features are computed once per prompt and step")
    lines = [f"vision tower: {size} parameters, {held}"]
    if vision.tokens_per_image is None:
        lines.append("visual tokens per image: not capped (data.vision_resolution unset); they count in "
                     f"data.max_prompt_tokens, so one image may fill a prompt: at most {vision.tokens_per_prompt:,}")
    else:
        lines.append(f"visual tokens per image: at most {vision.tokens_per_image:,} (data.vision_resolution "
                     f"{vision.resolution}: at most {vision.resolution} x {vision.resolution} pixels, a token per "
                     f"{vision.merged_patch_pixels} x {vision.merged_patch_pixels}); they count in data.max_prompt_tokens: a prompt holds at most "
                     f"{vision.tokens_per_prompt:,} ({vision.images_per_prompt} images, "
                     f"{vision.patches_per_prompt:,} patches through the tower)")
        if vision.tokens_per_prompt < vision.tokens_per_image:
            lines.append(f"  an image at the full resolution does not fit in data.max_prompt_tokens: such prompts "
                         "are skipped; raise it or lower data.vision_resolution")
    return lines


def memory_lines(memory: MemoryPlan) -> list[str]:
    """Bytes per GPU, phase by phase, and whether each phase fits."""
    cluster, states, training, rollout = memory.cluster, memory.states, memory.training, memory.rollout
    micro = training.micro
    sharded = f", 1/{cluster.gpus} each" if cluster.gpus > 1 else ""
    ep = memory.expert_parallel
    if ep > 1 and ep != cluster.gpus:
        sharded += f", the experts 1/{ep}"
    lines = [
        f"memory per {cluster.device}: {cluster.gpus} x {cluster.gpu_memory_gb:g} GB = "
        f"{cluster.capacity_bytes / GIB:.2f} GiB each, {memory.usable / GIB:.2f} GiB planned "
        f"({HEADROOM_FIXED_GIB:g} GiB + {HEADROOM_FRACTION:.0%} left for "
        f"{'the CUDA context' if cluster.device == 'GPU' else 'the rest of the process'} and allocator fragmentation)",
        f"  precision: {memory.compute.label}",
        *([f"  expert parallelism: groups of {ep} GPUs split every MoE layer's experts (distributed.expert_parallel); "
           "FSDP2 shards the other weights"] if ep > 1 else []),
        _row(f"  frozen {states.lora_base} base weights + fp32 adapters" if states.lora_base
             else f"  weights (fp32{sharded})", states.weights),
        _row(f"  gradients (fp32{sharded}; freed after each update)", states.gradients),
        _row(f"  AdamW exp_avg + exp_avg_sq (fp32{sharded})", states.optimizer),
    ]
    if states.reference:
        lines.append(_row(f"  reference model for the KL (fp32{sharded})", states.reference))
    if states.images:
        lines.append(_row("  prompts' pixel values + image features (through the step)", states.images))
    lines += [
        f"  training, micro_batch_tokens {micro.budget:,}: {micro.sequences} sequences of {micro.length:,} tokens "
        f"({micro.tokens:,} tokens) per micro-batch",
        _row("    " + _compute_weights_label(memory.compute, ep), training.compute_weights),
    ]
    if training.block_gradients:
        lines.append(_row("    one block's unsharded gradients + fp32 reduce-scatter input",
                          training.block_gradients))
    lines += [
        _row("    activations with checkpointing" + _configured(training.checkpointing),
             training.activations_checkpointed),
        _row("    activations without checkpointing" + _configured(not training.checkpointing),
             training.activations_full),
        _row("    fused lm_head loss working set" + (f" (logits recomputed in {TILE_ROWS} x {TILE_VOCAB} tiles)"
                                                  if memory.cluster.device == "GPU" else ""),
             training.fused_loss),
        *([_row("    vision tower activations (its micro-batch's images)", training.tower_activations)]
          if training.tower_activations else []),
        _row("    backward of one block" + (", recomputed" if training.checkpointing else ""), training.backward),
        _verdict("    training peak (the larger of loss and backward counts)", training.peak(states),
                 memory.usable),
        _row("  old log-prob scoring forward (no grad): peak", memory.scoring.peak(states)),
        f"  rollout: {rollout.sequences} sequences per GPU, {rollout.columns:,} KV cache columns each "
        f"({rollout.slot_bytes / GIB:.3f} GiB per sequence)",
        _concurrency_line(rollout),
        _row("    " + _generation_weights_label(memory.compute, ep), rollout.generation_weights),
        _row(f"    KV cache: {rollout.concurrency} slots", rollout.kv_cache),
        _row("    sampling: logits and their working set", rollout.sampling),
        _row("    prefill: one chunk's forward and attention masks", rollout.prefill),
        *([_row("    the gather's last all-gather output (before generation)", rollout.gather_output)]
          if rollout.gather_output else []),
        _verdict("    rollout peak (gradients freed)", memory.rollout_peak, memory.usable),
        _micro_batch_line(memory),
    ]
    if not memory.rollout_fits:
        lines += _rollout_advice(memory)
    if (not memory.rollout_fits or not memory.training_fits) and states.lora_base == "fp32":
        lines.append("  lora.base_bf16: true (under bf16-mixed) stores the frozen base in bf16, half its bytes, and "
                     "leaves autocast no weights to copy")
    return lines


def _concurrency_line(rollout: Rollout) -> str:
    source = (f"rollout.kv_cache_gb {rollout.budget_gb:g}" if rollout.budget_gb is not None
              else "what fits beside the weights and states; rollout.kv_cache_gb sets it")
    if not rollout.reduced:
        return f"    concurrency: all {rollout.sequences} sequences at once ({source})"
    return (f"    concurrency REDUCED: {rollout.concurrency} of {rollout.sequences} sequences at once ({source}); the "
            f"others wait for a free slot: at most {rollout.decode_steps:,} decode steps instead of "
            f"{rollout.max_new_tokens:,}")


def _compute_weights_label(compute: Compute, ep: int = 1) -> str:
    if compute.sharded:
        experts = " without experts, + a layer's local experts cast" if ep > 1 else ""
        return f"unsharded {'bf16' if compute.weights == 2 else 'fp32'} weights: 2 blocks + the root{experts}"
    if compute.autocast_copies:
        return "bf16 weight copies (autocast's cache, the experts' casts)"
    return "compute weights: the fp32 weights themselves"


def _generation_weights_label(compute: Compute, ep: int = 1) -> str:
    if compute.sharded and ep > 1:
        return (f"every weight but the experts gathered in {'bf16' if compute.weights == 2 else 'fp32'} "
                "for generation (+ one layer's local experts cast)")
    if compute.sharded:
        return f"every weight gathered in {'bf16' if compute.weights == 2 else 'fp32'} for generation"
    if compute.autocast_copies:
        return "bf16 weight copies (autocast's cache)"
    return "weights for generation: the fp32 weights themselves"


def _micro_batch_line(memory: MemoryPlan) -> str:
    verdict = "fits" if memory.training_fits else "does not fit"
    configured = f"the configured {memory.training.micro.budget:,} {verdict}"
    if memory.largest is None:
        return (f"  largest micro-batch that fits: none, not even one sequence of {memory.training.micro.length:,} "
                f"tokens; {configured}")
    best = memory.largest.micro
    whole = ", the whole minibatch" if memory.largest_is_whole_minibatch else ""
    return (f"  largest micro-batch that fits: micro_batch_tokens {best.budget:,} (searched in multiples of "
            f"{MICRO_BATCH_STEP}): {best.sequences} sequences, {best.tokens:,} tokens{whole}; {configured}")


def _rollout_advice(memory: MemoryPlan) -> list[str]:
    held = memory.states.weights + memory.states.optimizer + memory.states.reference
    rollout = memory.rollout
    generating = rollout.kv_cache + max(rollout.sampling, rollout.prefill)
    if rollout.gather_output > generating:
        working = f"{_gib(rollout.gather_output)} of the gather's last all-gather output"
    else:
        working = (f"{_gib(rollout.kv_cache)} of KV cache + {_gib(max(rollout.sampling, rollout.prefill))} of "
                   "sampling / prefill")
    lines = [
        f"  the rollout phase does not fit: {_gib(held)} of weights and AdamW states + "
        f"{_gib(rollout.generation_weights)} of weights for generation + {working} = {_gib(memory.rollout_peak)}, "
        f"{_gib(memory.rollout_peak - memory.usable)} more than {_gib(memory.usable)}",
    ]
    if memory.compute.sharded and memory.expert_parallel == 1:
        lines.append("  every GPU holds the whole model while it generates: expert-parallel rollouts (each GPU "
                     "keeps its share of the experts: distributed.expert_parallel, docs/scaling.md) are the way "
                     "out; fewer prompts per step only shrink the KV cache")
    elif memory.compute.sharded:
        lines.append("  more GPUs shard the states further; fewer prompts per step or shorter completions shrink the "
                     "KV cache")
    else:
        lines.append("  fewer prompts per step or shorter completions shrink the KV cache; more GPUs shard the "
                     "states")
    if rollout.budget_gb is not None:
        lines.append(f"  a smaller rollout.kv_cache_gb than {rollout.budget_gb:g} (or null: what fits) shrinks the KV "
                     "cache; fewer sequences then decode at once")
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
