"""The GSPO training loop. Each step, top to bottom:

1. take `prompts_per_step` prompts and sample `group_size` completions of each (KV-cache rollout);
2. score them (rewards) and turn the scores into group-normalised advantages (GSPO eq. 6);
3. old log-probs of the sampled tokens: one no-grad forward of the policy ("recompute") or the
   sampler's own ("rollout"); reference log-probs when beta > 0 (with LoRA: the same model with
   its adapters switched off, so no second copy of the weights);
4. split the batch into `num_minibatches`; for each: micro-batches under a token budget,
   hidden states -> fused lm_head + GSPO loss -> backward, then clip, AdamW step;
5. LR schedule, metrics, checkpoint.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import gspo_kernels as gk
from gspo_engine.advantages import group_advantages
from gspo_engine.batching import (
    Sample,
    TrainBatch,
    collate,
    equalize_micro_batches,
    split_micro_batches,
    split_minibatches,
)
from gspo_engine.checkpoint import load_pretrained, read_config, save_pretrained
from gspo_engine.config import Config, dump_config
from gspo_engine.data import PromptDataset, PromptLoader, read_rows, reward_inputs
from gspo_engine.distributed.parallel import data_parallel_mesh, gathered_weights, parallelize
from gspo_engine.distributed.runtime import Runtime, init_runtime
from gspo_engine.distributed.sharded_checkpoint import (
    broadcast_full_state_dict,
    full_model_state_dict,
    is_sharded_checkpoint,
    load_sharded,
    save_sharded,
)
from gspo_engine.lora import adapter_parameters, adapters_disabled, add_lora, is_adapter_folder, load_adapters, save_adapters
from gspo_engine.metrics import MetricsLog, console_line
from gspo_engine.model import Qwen3Model
from gspo_engine.optim import build_optimizer, build_scheduler
from gspo_engine.rewards import CombinedReward, RewardSpec
from gspo_engine.rollout import generate
from gspo_engine.tasks import TaskConfig, generate_task_rows
from gspo_engine.tiny import TINY_MODELS, build_tiny_checkpoint
from gspo_engine.tokenizer import load_tokenizer
from gspo_engine.train_checkpoint import (
    load_trainer_state,
    resolve_resume,
    save_checkpoint,
    save_sharded_checkpoint,
    set_rng_state,
)

logger = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """The run cannot go on (too many non-finite updates in a row); the last checkpoint is intact."""


@dataclass
class TrainSummary:
    steps: int
    window: int  # steps averaged at each end: 10, or half the run when it is shorter
    first_reward_mean: float
    last_reward_mean: float
    skipped_updates: int
    output_dir: Path
    final_dir: Path


def resolve_device(config: Config) -> torch.device:
    if config.train.device == "cuda" and not torch.cuda.is_available():
        raise TrainingError("train.device is cuda but no GPU is visible")
    if config.train.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(config.train.device)


def resolve_precision(config: Config, device: torch.device) -> str:
    if config.train.precision == "auto":
        return "bf16-mixed" if device.type == "cuda" else "fp32"
    return config.train.precision


def model_folder(config: Config, output_dir: Path) -> Path:
    """The checkpoint folder the run starts from; the tiny models are built there on first use."""
    name = config.model.name_or_path
    if name in TINY_MODELS:
        folder = output_dir / name
        if not (folder / "config.json").is_file():
            build_tiny_checkpoint(name, folder, seed=config.model.seed)
        return folder
    folder = Path(name)
    if not (folder / "config.json").is_file():
        raise TrainingError(
            f"model.name_or_path: {name} is neither a model folder with config.json nor one of {', '.join(TINY_MODELS)}"
        )
    return folder


def eos_token_ids(folder: Path, tokenizer) -> list[int]:
    """Every token that ends a completion: generation_config.json's eos ids (Qwen3 lists two) and the tokenizer's."""
    ids = {tokenizer.eos_token_id}
    generation_config = folder / "generation_config.json"
    if generation_config.is_file():
        value = json.loads(generation_config.read_text()).get("eos_token_id")
        ids.update(value if isinstance(value, list) else [value] if value is not None else [])
    return sorted(i for i in ids if i is not None)


def build_dataset(config: Config, tokenizer) -> PromptDataset:
    data = config.data
    common = dict(prompt_column=data.prompt_column, max_prompt_tokens=data.max_prompt_tokens,
                  chat_template=data.chat_template, enable_thinking=data.enable_thinking)
    if data.dataset == "builtin":
        tasks = TaskConfig(tasks=tuple(data.builtin.tasks), min_length=data.builtin.min_length,
                           max_length=data.builtin.max_length, num_digits=data.builtin.num_digits)
        rows = generate_task_rows(tasks, data.builtin.num_rows, seed=data.seed)
        return PromptDataset.from_rows(rows, tokenizer, source="builtin tasks", **common)
    return PromptDataset.from_rows(read_rows(data.dataset), tokenizer, source=data.dataset, **common)


def build_rewards(config: Config) -> CombinedReward:
    specs = list(config.rewards) or [RewardSpec(function="digit_match")]
    return CombinedReward(specs)


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # ru_maxrss is in KiB on Linux, bytes on macOS.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def check_data_parallel_split(config: Config, world: int) -> None:
    """Each rank samples whole groups, and every rank must run the same number of optimizer steps."""
    if world == 1:
        return
    if config.lora.rank:
        raise TrainingError("LoRA runs on one process; launch it without torchrun (lora.rank > 0)")
    prompts = config.rollout.prompts_per_step
    if prompts % world:
        raise TrainingError(
            f"rollout.prompts_per_step ({prompts}) must be a multiple of the number of ranks ({world}): "
            "each rank samples all completions of its own prompts"
        )
    per_rank = prompts // world * config.rollout.group_size
    if per_rank < config.gspo.num_minibatches:
        raise TrainingError(
            f"each of the {world} ranks holds {per_rank} completions, fewer than gspo.num_minibatches "
            f"({config.gspo.num_minibatches}); raise rollout.prompts_per_step"
        )


class GSPOTrainer:
    def __init__(self, config: Config, echo=print):
        self.config = config
        requested = resolve_device(config)
        self.runtime: Runtime = init_runtime(requested.type, config.distributed.timeout_s)
        self.echo = echo if self.runtime.is_main else (lambda *args, **kwargs: None)
        self.output_dir = Path(config.output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.device = self.runtime.device(requested)
        self.precision = resolve_precision(config, self.device)
        if self.device.type == "cpu" and config.train.cpu_threads:
            torch.set_num_threads(config.train.cpu_threads)
        torch.manual_seed(config.train.seed)
        check_data_parallel_split(config, self.runtime.world_size)

        if self.runtime.is_main:  # one rank builds the embedded tiny model; the others wait for it
            model_folder(config, self.output_dir)
        self.runtime.barrier()
        self.source = model_folder(config, self.output_dir)
        self.tokenizer = load_tokenizer(self.source)
        self.eos_ids = eos_token_ids(self.source, self.tokenizer)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_ids[0]
        self.dataset = build_dataset(config, self.tokenizer)
        self.loader = PromptLoader(self.dataset, config.rollout.prompts_per_step, seed=config.data.seed)
        self.rewards = build_rewards(config)

        resume_from = resolve_resume(config.checkpoint.resume, self.output_dir)
        self.lora = config.lora if config.lora.rank else None
        if resume_from is not None and is_adapter_folder(resume_from) != (self.lora is not None):
            held = "LoRA adapters" if self.lora is None else "full weights, not LoRA adapters"
            raise TrainingError(f"{resume_from} holds {held}; resume it with the lora settings it was trained with")
        resume_sharded = resume_from is not None and is_sharded_checkpoint(resume_from)
        if self.runtime.distributed:
            if resume_from is not None and not resume_sharded:
                raise TrainingError(
                    f"{resume_from} was written by a single-process run (Hugging Face weights, a whole optimizer "
                    f"state); resume it without torchrun, or start a distributed run from its weights with "
                    f"model.name_or_path={resume_from}"
                )
            self.model = self._load_sharded_model(self.source)
        elif self.lora is None:
            # A sharded checkpoint's weights are read by load_sharded below, over the starting model's.
            self.model = self._load_model(self.source if resume_sharded else resume_from or self.source)
        else:
            self.model = self._load_adapted_model(resume_from)
        self.reference = None
        if config.gspo.beta > 0 and self.lora is None:
            # The reference policy is the starting model, frozen: the KL keeps the policy near it.
            if self.runtime.distributed:
                self.reference = self._load_sharded_model(self.source)
            else:
                self.reference = self._load_model(self.source) if resume_from else copy.deepcopy(self.model)
            self.reference.requires_grad_(False).eval()
        self.optimizer = build_optimizer(self.model.parameters(), config.optim)
        self.scheduler = build_scheduler(self.optimizer, config.train.steps, config.optim)
        self.step = 0
        self.skipped_updates = 0
        self.consecutive_skips = 0
        if resume_from is not None:
            self._restore(resume_from)
        self.metrics = None
        if self.runtime.is_main:
            self.metrics = MetricsLog(self.output_dir, tensorboard=config.logging.tensorboard,
                                      resume_step=self.step if resume_from is not None else None)
        # Sampling and the loss use the same temperature (gspo.md); greedy rollouts score at 1.
        self.temperature = config.rollout.temperature if config.rollout.temperature > 0 else 1.0

    # ----------------------------------------------------------------- set-up
    def _load_sharded_model(self, folder: Path) -> Qwen3Model:
        """The model sharded over every rank: rank 0 reads the checkpoint, each rank receives only its shards.

        The other ranks build the model on the meta device (no memory), so no rank but the first
        ever holds the whole model, and that one only on the CPU.
        """
        if self.runtime.is_main:
            model = self._load_model(folder, device=torch.device("cpu"))
            full_state = model.state_dict()
        else:
            args = read_config(folder)
            args.dtype = torch.float32
            with torch.device("meta"):
                model = Qwen3Model(args)
            self._configure(model)
            full_state = {}
        mesh = data_parallel_mesh(self.runtime, self.device)
        parallelize(model, mesh, bf16_compute=self.precision == "bf16-mixed",
                    reshard_after_forward=self.config.distributed.reshard_after_forward)
        model.to_empty(device=self.device)
        broadcast_full_state_dict(model, full_state)
        # The loss is a sum over each rank's sequences divided by the global count: gradients add up.
        # (Plain sums: gloo has no pre-scaled reduction.)
        for unit in [model, *model.layers]:
            unit.set_gradient_divide_factor(1.0)
            unit.set_force_sum_reduction_for_comms(True)
        return model

    def _load_model(self, folder: Path, dtype: torch.dtype = torch.float32, device: torch.device | None = None
                    ) -> Qwen3Model:
        model = load_pretrained(folder, dtype=dtype, device=device or self.device)
        self._configure(model)
        return model

    def _configure(self, model: Qwen3Model) -> None:
        model.args.source_path = str(self.source)  # tokenizer files travel with every save
        model.args.activation_checkpointing = self.config.model.activation_checkpointing
        model.args.router_aux_loss = self.config.model.router_aux_loss_coef > 0 and model.args.is_moe
        if model.args.router_aux_loss:
            model.args.router_aux_loss_coef = self.config.model.router_aux_loss_coef

    def _load_adapted_model(self, resume_from: Path | None) -> Qwen3Model:
        """The frozen starting model with trainable adapters: fresh ones (B = 0), or a checkpoint's."""
        base_dtype = torch.float32
        if self.lora.base_bf16:
            if self.precision != "bf16-mixed":
                raise TrainingError("lora.base_bf16 needs train.precision bf16-mixed")
            base_dtype = torch.bfloat16
        model = self._load_model(self.source, base_dtype)
        add_lora(model, self.lora)
        if resume_from is not None:
            load_adapters(model, resume_from)
        return model

    def _restore(self, folder: Path) -> None:
        state = load_trainer_state(folder)
        if is_sharded_checkpoint(folder):
            load_sharded(folder, self.model, self.optimizer)
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.loader.load_state_dict(state["data"])
        self.step = state["step"]
        self.skipped_updates = state["skipped_updates"]
        set_rng_state(state["rng"])
        self.echo(f"resumed from {folder} at step {self.step}")

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16-mixed")

    # ------------------------------------------------------------- the loop
    def train(self) -> TrainSummary:
        config = self.config
        self.echo(dump_config(config).rstrip())
        if self.runtime.is_main:
            (self.output_dir / "config.yaml").write_text(dump_config(config))
        total = sum(p.numel() for p in self.model.parameters())
        trained = "" if self.lora is None else (
            f", LoRA rank {self.lora.rank}: {sum(p.numel() for p in adapter_parameters(self.model)) / 1e6:.3f}M trained"
        )
        self.echo(
            f"model {self.source} ({total / 1e6:.2f}M parameters{trained}, "
            f"{'MoE' if self.model.args.is_moe else 'dense'}) on {self.device}{self._ranks_text()}, "
            f"precision {self.precision}; "
            f"{len(self.dataset)} prompts ({self.dataset.num_skipped} skipped as too long)"
        )
        from tqdm import tqdm

        progress = tqdm(total=config.train.steps, initial=self.step, desc="gspo", unit="step", dynamic_ncols=True,
                        disable=not self.runtime.is_main)
        try:
            while self.step < config.train.steps:
                record = self.train_step()
                self.step += 1
                progress.update(1)
                if self.metrics is not None:
                    self.metrics.log(self.step, record)
                if self.runtime.is_main and (self.step % config.logging.every == 0 or self.step == config.train.steps):
                    progress.write(console_line(self.step, record))
                every = config.checkpoint.every
                if every and self.step % every == 0 and self.step < config.train.steps:
                    self.save_checkpoint()
        finally:
            progress.close()
        final_dir = self.output_dir / "final"
        self.save_weights(final_dir)
        if self.metrics is not None:
            self.metrics.close()
        return self._summary(final_dir)

    def _ranks_text(self) -> str:
        world = self.runtime.world_size
        return f" x {world} ranks (FSDP2)" if self.runtime.distributed else ""

    def train_step(self) -> dict:
        config = self.config
        step_start = time.perf_counter()
        # Every rank reads the same global batch and samples its share of the prompts: rank r
        # takes prompts r, r + N, r + 2N, ... so that the minibatches, split on each rank, add up to
        # those of one process with the whole batch.
        runtime = self.runtime
        global_examples = next(self.loader)
        indices = list(range(runtime.rank, len(global_examples), runtime.world_size))
        examples = [global_examples[index] for index in indices]

        # 1. rollout
        rollout_start = time.perf_counter()
        group = config.rollout.group_size
        prompts = [example.token_ids for example in examples for _ in range(group)]
        # Draws keyed by each completion's place in the global batch: the same tokens on any number of ranks.
        sample_ids = [index * group + j for index in indices for j in range(group)]
        self.model.eval()
        with torch.no_grad(), self._autocast(), gathered_weights(self.model, config.distributed.reshard_after_forward):
            out = generate(
                self.model, prompts, max_new_tokens=config.rollout.max_new_tokens,
                temperature=config.rollout.temperature, top_p=config.rollout.top_p, top_k=config.rollout.top_k,
                eos_token_id=self.eos_ids, seed=config.train.seed * 1_000_003 + self.step, sample_ids=sample_ids,
            )
        rollout_s = time.perf_counter() - rollout_start
        completions = self.tokenizer.batch_decode(out.tokens, skip_special_tokens=True)

        # 2. rewards and advantages
        prompt_texts, columns = reward_inputs(examples, group)
        scored = self.rewards(completions, prompt_texts, columns)
        rewards = torch.tensor(scored.total, dtype=torch.float32)
        advantages = group_advantages(rewards, group, config.gspo.advantage_scale, config.gspo.advantage_eps)
        samples = [
            Sample(prompt_ids=list(prompt), completion_ids=list(tokens), advantage=float(adv),
                   rollout_logps=logps, reward=float(reward))
            for prompt, tokens, logps, adv, reward in zip(prompts, out.tokens, out.logps, advantages.values, rewards)
        ]

        # 3. old (and reference) log-probs
        update_start = time.perf_counter()
        if config.gspo.old_logps == "recompute":
            self.score_samples(self.model, samples, "old_logps", record_routing=config.model.routing_replay)
        else:
            for sample in samples:
                sample.old_logps = sample.rollout_logps
        if config.gspo.beta > 0:
            self.score_reference(samples)

        # 4. update, one optimizer step per minibatch
        self.model.train()
        update = self.update(samples)
        self.scheduler.step()
        update_s = time.perf_counter() - update_start

        rollout_tokens = sum(len(t) for t in out.tokens)
        update_tokens = sum(s.length for s in samples) * (2 if config.gspo.old_logps == "recompute" else 1)
        # Every rank's share of the step, combined into the metrics of the whole batch.
        ranks = runtime.gather(dict(
            rewards=rewards.tolist(), per_reward=scored.per_reward, failures=sum(scored.failures.values()),
            constant_groups=advantages.constant_groups, rollout_tokens=rollout_tokens, update_tokens=update_tokens,
            finished=sum(out.finished), rollout_s=rollout_s, update_s=update_s,
            step_s=time.perf_counter() - step_start, peak_memory_mib=peak_memory_mib(self.device),
        ))
        all_rewards = torch.tensor([r for rank in ranks for r in rank["rewards"]], dtype=torch.float64)
        per_reward: dict[str, list[float]] = {}
        for rank in ranks:
            for name, values in rank["per_reward"].items():
                per_reward.setdefault(name, []).extend(values)
        total = lambda key: sum(rank[key] for rank in ranks)  # noqa: E731
        slowest = lambda key: max(rank[key] for rank in ranks)  # noqa: E731
        record = {
            "reward_mean": all_rewards.mean().item(),
            "reward_std": all_rewards.std(unbiased=False).item(),
            **{f"reward/{name}": sum(values) / len(values) for name, values in per_reward.items()},
            "reward_failures": total("failures"),
            "constant_groups": total("constant_groups"),
            "response_len_mean": total("rollout_tokens") / len(all_rewards),
            "finished_frac": total("finished") / len(all_rewards),
            **update,
            "lr": self.scheduler.get_last_lr()[0],
            "skipped_updates": self.skipped_updates,
            "rollout_s": slowest("rollout_s"),
            "update_s": slowest("update_s"),
            "rollout_tokens_per_s": total("rollout_tokens") / slowest("rollout_s"),
            "update_tokens_per_s": total("update_tokens") / slowest("update_s"),
            "tokens_per_s": (total("rollout_tokens") + total("update_tokens")) / slowest("step_s"),
            "peak_memory_mib": slowest("peak_memory_mib"),
        }
        every = config.logging.sample_every
        if every and (self.step + 1) % every == 0:
            self.echo(f"sample: {prompt_texts[0]!r} -> {completions[0]!r} (reward {rewards[0]:.3f})")
        return record

    def head_inputs(self, hidden: torch.Tensor, model: Qwen3Model) -> tuple[torch.Tensor, torch.Tensor]:
        """Final hidden states and lm_head weight in the compute dtype: bf16 under bf16-mixed (autocast does
        not reach the fused kernels, and the final norm returns fp32), else the hidden states' dtype."""
        dtype = torch.bfloat16 if self.precision == "bf16-mixed" else hidden.dtype
        return hidden.to(dtype), model.lm_head_weight.to(dtype)

    def score_samples(self, model: Qwen3Model, samples: list[Sample], attribute: str, record_routing=False) -> None:
        """Per-token log-probs of each completion under `model` (no gradient), stored on the samples."""
        model.eval()
        with torch.no_grad(), self._autocast():
            for micro in self.micro_batches(samples):
                if not micro:  # another rank has more micro-batches: join its forwards' weight gathers
                    model.run(collate(samples[:1], self.pad_id, self.device).input_ids)
                    continue
                batch = collate(micro, self.pad_id, self.device)
                output = model.run(batch.input_ids)
                hidden, weight = self.head_inputs(output.hidden_states, model)
                logps = gk.token_logprobs(hidden, weight, batch.targets, temperature=self.temperature)
                for row, sample in enumerate(micro):
                    setattr(sample, attribute, logps[row][batch.mask[row]].float().cpu())
                    if record_routing:
                        width = sample.length
                        sample.old_routing = [
                            r.expert_indices.view(len(micro), batch.input_ids.shape[1], -1)[row, :width].cpu()
                            for r in output.routing
                        ]
                # Freed before the next micro-batch's forward, not when the names are next assigned.
                del batch, output, hidden, weight, logps

    def score_reference(self, samples: list[Sample]) -> None:
        """Reference log-probs: of the frozen starting model, or with LoRA of the model with its adapters off."""
        if self.reference is not None:
            self.score_samples(self.reference, samples, "ref_logps")
            return
        with adapters_disabled(self.model):
            self.score_samples(self.model, samples, "ref_logps")

    def micro_batches(self, samples: list[Sample]) -> list[list[Sample]]:
        """Micro-batches under the token budget; on several ranks, as many on each (empty ones pad).

        Every forward and backward of a sharded model gathers weights with all ranks, so each rank
        must run the same number of them.
        """
        micro = split_micro_batches(samples, self.config.gspo.micro_batch_tokens)
        if not self.runtime.distributed:
            return micro
        return equalize_micro_batches(micro, int(self.runtime.max([len(micro)])[0]))

    def update(self, samples: list[Sample]) -> dict:
        """One optimizer step per minibatch; gradient accumulation over micro-batches is exact.

        On several ranks, each rank's minibatch is its share of the global one; the loss is
        normalised by the global number of valid sequences and the gradients are summed, so the
        update equals one process's on the whole batch.
        """
        config = self.config
        minibatches = split_minibatches(samples, config.gspo.num_minibatches)
        totals: dict[str, float] = {}
        imbalance: list[float] = []
        for minibatch in minibatches:
            stats = self.accumulate_gradients(minibatch)
            imbalance.extend(stats.pop("expert_imbalance", []))
            stats = dict(zip(stats, self.runtime.sum(list(stats.values()))))
            # Listed after the backward: FSDP2 swaps its units' gathered parameters for the sharded
            # ones (which hold the gradients) only once their gradients are reduced.
            params = [p for p in self.model.parameters() if p.requires_grad]
            grad_norm = torch.nn.utils.clip_grad_norm_(params, config.optim.max_grad_norm)
            grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
            if math.isfinite(stats["loss"]) and math.isfinite(grad_norm):
                self.optimizer.step()
                self.consecutive_skips = 0
            else:
                self.skipped_updates += 1
                self.consecutive_skips += 1
                logger.warning("step %d: non-finite loss %s or grad norm %s; update skipped",
                               self.step + 1, stats["loss"], grad_norm)
                if self.consecutive_skips >= config.train.max_consecutive_skips:
                    raise TrainingError(
                        f"{self.consecutive_skips} non-finite updates in a row (train.max_consecutive_skips); "
                        f"stopping. The last checkpoint in {self.output_dir} is intact."
                    )
            self.optimizer.zero_grad(set_to_none=True)
            stats["grad_norm"] = grad_norm
            for key, value in stats.items():
                totals[key] = totals.get(key, 0.0) + value / len(minibatches)
        if self.runtime.distributed and self.model.args.is_moe:
            imbalance = [self.runtime.max([max(imbalance, default=0.0)])[0]]
        if imbalance:
            totals["expert_imbalance"] = max(imbalance)
        return totals

    def accumulate_gradients(self, minibatch: list[Sample]) -> dict:
        """Backward of the minibatch's loss (a mean over its valid sequences), micro-batch by micro-batch.

        A micro-batch's loss is the mean over its own valid sequences (those with a completion
        token); weighted by its share of the minibatch's valid sequences (over all ranks), the
        micro-batch gradients sum to the minibatch's exactly. The statistics returned are this
        rank's parts of the minibatch's: summed over ranks they are the minibatch's.
        """
        stats = {"loss": 0.0, "ratio_mean": 0.0, "clip_frac": 0.0, "clip_frac_low": 0.0, "clip_frac_high": 0.0,
                 "kl": 0.0}
        if self.model.args.router_aux_loss:
            stats["aux_loss"] = 0.0
        imbalance = []
        valid = lambda samples: sum(1 for s in samples if s.completion_ids)  # noqa: E731
        minibatch_valid, minibatch_tokens = self.runtime.sum(
            [valid(minibatch), sum(len(s.completion_ids) for s in minibatch)]
        )
        for micro in self.micro_batches(minibatch):
            if not micro:
                # Padding for the ranks with more micro-batches: a forward and backward that add nothing.
                batch = collate(minibatch[:1], self.pad_id, self.device)
                with self._autocast():
                    loss, _, aux_loss, _ = self.micro_batch_loss(batch, minibatch[:1])
                    total = loss if aux_loss is None else loss + aux_loss
                (total * 0.0).backward()
                continue
            batch = collate(micro, self.pad_id, self.device)
            share = valid(micro) / max(minibatch_valid, 1)
            token_share = batch.mask.sum().item() / max(minibatch_tokens, 1)
            with self._autocast():
                loss, metrics, aux_loss, routing = self.micro_batch_loss(batch, micro)
                total = loss if aux_loss is None else loss + aux_loss
            (total * share).backward()
            stats["loss"] += float(loss.detach()) * share
            stats["ratio_mean"] += float(metrics["ratio_mean"]) * share
            for key in ("clip_frac", "clip_frac_low", "clip_frac_high", "kl"):
                stats[key] += float(metrics[key]) * token_share
            if aux_loss is not None:
                stats["aux_loss"] += float(aux_loss.detach()) * share
            if routing:
                imbalance.append(self.expert_imbalance(routing, batch))
        if imbalance:
            stats["expert_imbalance"] = imbalance
        return stats

    def micro_batch_loss(self, batch: TrainBatch, micro: list[Sample]):
        config = self.config
        forced = None
        if config.model.routing_replay and self.model.args.is_moe:
            length = batch.input_ids.shape[1]
            forced = []
            for layer in range(len(self.model.args.moe_layers)):
                experts = torch.zeros(len(micro), length, self.model.args.num_experts_per_tok, dtype=torch.long)
                for row, sample in enumerate(micro):
                    recorded = sample.old_routing[layer]
                    experts[row, : recorded.shape[0]] = recorded
                forced.append(experts.view(-1, experts.shape[-1]).to(self.device))
        # The attention mask only matters to the aux loss, which must not count padding.
        attention_mask = batch.real.long() if self.model.args.router_aux_loss else None
        output = self.model.run(batch.input_ids, attention_mask=attention_mask, forced_experts=forced)
        hidden, weight = self.head_inputs(output.hidden_states, self.model)
        old = batch.scatter([s.old_logps for s in micro])
        ref = batch.scatter([s.ref_logps for s in micro]) if config.gspo.beta > 0 else None
        loss, metrics = gk.fused_linear_gspo_loss(
            hidden, weight, batch.targets, old, batch.advantages, batch.mask,
            temperature=self.temperature, level=config.gspo.level, eps_low=config.gspo.eps_low,
            eps_high=config.gspo.eps_high, ref_logps=ref, beta=config.gspo.beta,
        )
        return loss, metrics, output.aux_loss, output.routing

    def expert_imbalance(self, routing, batch: TrainBatch) -> float:
        """Max over MoE layers of (most tokens any expert got) / (mean tokens per expert), real tokens only."""
        real = batch.real.reshape(-1)
        worst = 0.0
        for layer in routing:
            counts = torch.bincount(layer.expert_indices[real].reshape(-1), minlength=self.model.args.num_experts)
            worst = max(worst, float(counts.max() / counts.float().mean().clamp(min=1e-9)))
        return worst

    # ------------------------------------------------------------ outputs
    def save_weights(self, folder: Path) -> None:
        """A Hugging Face checkpoint, or with LoRA a PEFT adapter folder (export --merge merges it).

        A sharded model is gathered whole on rank 0's CPU, which writes it.
        """
        if self.runtime.distributed:
            full_state = full_model_state_dict(self.model)
            if self.runtime.is_main:
                with torch.device("meta"):
                    whole = Qwen3Model(copy.copy(self.model.args))
                whole.load_state_dict(full_state, assign=True)
                save_pretrained(whole, folder)
            self.runtime.barrier()
        elif self.lora is None:
            save_pretrained(self.model, folder)
        else:
            save_adapters(self.model, self.lora, folder)

    def save_checkpoint(self) -> Path:
        state = {
            "scheduler": self.scheduler.state_dict(),
            "data": self.loader.state_dict(),
            "step": self.step,
            "skipped_updates": self.skipped_updates,
        }
        keep_last = self.config.checkpoint.keep_last
        if self.runtime.distributed:
            path = save_sharded_checkpoint(
                self.output_dir, self.step, lambda folder: save_sharded(folder, self.model, self.optimizer),
                self.model.args, state, keep_last, self.runtime,
            )
        else:
            state["optimizer"] = self.optimizer.state_dict()
            path = save_checkpoint(self.output_dir, self.step, self.save_weights, state, keep_last)
        logger.info("saved %s", path)
        return path

    def _summary(self, final_dir: Path) -> TrainSummary:
        rewards = [r["reward_mean"] for r in self.metrics.records()] if self.metrics is not None else []
        window = min(10, max(1, len(rewards) // 2))
        first = sum(rewards[:window]) / window if rewards else float("nan")
        last = sum(rewards[-window:]) / window if rewards else float("nan")
        return TrainSummary(len(rewards), window, first, last, self.skipped_updates, self.output_dir, final_dir)
