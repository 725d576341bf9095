"""The GSPO training loop. Each step, top to bottom (`GSPOTrainer.train_step`):

1. rollout: `group_size` completions of each of this rank's prompts (KV-cache generation);
2. rewards, turned into group-normalised advantages (GSPO eq. 6);
3. old log-probs of the sampled tokens: one no-grad forward of the policy ("recompute") or the
   sampler's own ("rollout"); reference log-probs when beta > 0 (with LoRA: the same model with
   its adapters switched off, so no second copy of the weights);
4. the update (update.py): per minibatch, micro-batches under a token budget, hidden states ->
   fused lm_head + GSPO loss -> backward, then clip and AdamW; then the LR schedule;
5. metrics of the whole batch over every rank.

The models come from build_models.py, checkpoints go through run_checkpoint.py, and several
ranks (torchrun) are handled by distributed/: this file only orchestrates.
"""

from __future__ import annotations

import copy
import logging
import shutil
import time
from pathlib import Path

import torch
from tqdm import tqdm

from gspo_engine.advantages import group_advantages
from gspo_engine.batching import Sample
from gspo_engine.build_models import build_models, model_source
from gspo_engine.config import Config, dump_config
from gspo_engine.data import PromptLoader, build_dataset, reward_inputs
from gspo_engine.device import peak_memory_mib, resolve_device, resolve_precision
from gspo_engine.distributed.expert_sharding import finish_in_step
from gspo_engine.distributed.parallel import gathered_weights
from gspo_engine.distributed.rules import check_data_parallel
from gspo_engine.distributed.runtime import Runtime, init_runtime
from gspo_engine.errors import TrainingError, TrainingInterrupted
from gspo_engine.hf_checkpoint import read_config
from gspo_engine.lora import adapter_parameters
from gspo_engine.metrics import MetricsLog, TrainSummary, console_line, summarize
from gspo_engine.optim import build_optimizer, build_scheduler
from gspo_engine.planner.rollout_budget import rollout_kv_cache_gb
from gspo_engine.rewards import build_rewards
from gspo_engine.rollout import Generation, generate
from gspo_engine.run_checkpoint import (
    earlier_run_outputs,
    list_checkpoints,
    remove_stale_staging,
    resolve_resume,
    restore_run_checkpoint,
    save_model,
    save_run_checkpoint,
)
from gspo_engine.scoring import score_reference, score_samples
from gspo_engine.step_context import StepContext
from gspo_engine.step_metrics import RankShare, combine_ranks
from gspo_engine.tokenizer import eos_token_ids, load_tokenizer
from gspo_engine.update import PolicyUpdate
from gspo_engine.audio_prompts import AudioProcessing
from gspo_engine.vision_prompts import ImageProcessing

__all__ = ["GSPOTrainer", "TrainSummary", "TrainingError", "TrainingInterrupted"]

logger = logging.getLogger(__name__)


class GSPOTrainer:
    def __init__(self, config: Config, echo=print):
        # A copy with every "auto" resolved: config.yaml records what the run actually used.
        self.config = config = copy.deepcopy(config)
        requested = resolve_device(config.train.device)
        self.runtime: Runtime = init_runtime(requested.type, config.distributed.timeout_s)
        self.echo = echo if self.runtime.is_main else (lambda *args, **kwargs: None)
        self.output_dir = Path(config.output_dir)
        if self.output_dir.exists() and not self.output_dir.is_dir():
            raise TrainingError(f"output_dir: {self.output_dir} is a file; give a folder for the run's outputs")
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.device = self.runtime.device(requested)
        self.precision = resolve_precision(config.train.precision, self.device)
        config.train.device, config.train.precision = self.device.type, self.precision
        if self.device.type == "cpu" and config.train.cpu_threads:
            torch.set_num_threads(config.train.cpu_threads)
        torch.manual_seed(config.train.seed)
        check_data_parallel(config, self.runtime.world_size)

        if self.runtime.is_main:  # one rank builds the embedded tiny model or downloads a Hub one; the others wait
            model_source(config, self.output_dir)
        self.runtime.barrier()
        source = model_source(config, self.output_dir)
        self.source = source.folder
        # config.yaml records the folder read and, for a Hub id, the commit: the same run can be started again.
        config.model.resolved_folder = str(source.folder.resolve())
        if source.repo_id is not None:
            config.model.name_or_path, config.model.revision = source.repo_id, source.revision
        self.tokenizer = load_tokenizer(self.source)
        self.eos_ids = eos_token_ids(self.source, self.tokenizer)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_ids[0]
        # A Qwen3-VL model reads images with its own image processor at the run's resolution, a Qwen3-Omni
        # thinker audio with its own feature extractor too.
        model_args = read_config(self.source)
        vision_args = model_args.vision
        self.images = None if vision_args is None else ImageProcessing(
            self.source, vision_args, config.data.vision_resolution, config.data.vision_min_resolution)
        self.audio = None if model_args.audio is None else AudioProcessing(
            self.source, model_args.audio, self.tokenizer, config.data.max_audio_seconds)
        self.dataset = build_dataset(config.data, self.tokenizer, self.images, self.audio)
        self.loader = PromptLoader(self.dataset, config.rollout.prompts_per_step, seed=config.data.seed)
        self.rewards = build_rewards(config.rewards)
        config.rewards = list(self.rewards.specs)

        resume_from = resolve_resume(config.checkpoint.resume, self.output_dir)
        self._prepare_output_dir(resume_from is not None)
        self.lora = config.lora if config.lora.rank else None
        models = build_models(config, self.runtime, self.device, self.precision, self.source, resume_from)
        self.model, self.reference = models.policy, models.reference
        # The rollout's KV cache budget: as many sequences decode at once as it holds.
        self.kv_cache_gb = rollout_kv_cache_gb(config, self.runtime.world_size, self.source)
        if self.kv_cache_gb is not None:
            logger.info("rollout KV cache budget: %.3g GB", self.kv_cache_gb)
        self.optimizer = build_optimizer(self.model.parameters(), config.optim)
        self.scheduler = build_scheduler(self.optimizer, config.train.steps, config.optim)
        # Sampling and the loss use the same temperature; greedy rollouts score at 1.
        temperature = config.rollout.temperature if config.rollout.temperature > 0 else 1.0
        self.context = StepContext(self.runtime, self.device, self.precision, pad_id, temperature,
                                   config.gspo.micro_batch_tokens, config.gspo.packing)
        self.updater = PolicyUpdate(self.context, self.model, self.optimizer, config.gspo, config.optim.max_grad_norm,
                                    config.model.routing_replay, config.train.max_consecutive_skips)
        self.step = 0
        if resume_from is not None:
            self._restore(resume_from)
        self.metrics = None
        if self.runtime.is_main:
            self.metrics = MetricsLog(self.output_dir, tensorboard=config.logging.tensorboard,
                                      resume_step=self.step if resume_from is not None else None)

    @property
    def pad_id(self) -> int:
        return self.context.pad_id

    @property
    def skipped_updates(self) -> int:
        return self.updater.skipped_updates

    def _prepare_output_dir(self, resuming: bool) -> None:
        """Clear unfinished saves; never let a fresh run overwrite an earlier one unless asked to.

        Every rank checks (they see the same folder, so all stop together); rank 0 deletes.
        """
        earlier = [] if resuming else earlier_run_outputs(self.output_dir)
        if earlier and not self.config.overwrite_output_dir:
            raise TrainingError(
                f"output_dir {self.output_dir} holds an earlier run ({', '.join(p.name for p in earlier)}): continue "
                "it with --resume, choose another --output_dir, or pass --overwrite_output_dir to replace it"
            )
        self.runtime.barrier()  # every rank has looked before rank 0 deletes anything
        if self.runtime.is_main:
            for stale in remove_stale_staging(self.output_dir):
                self.echo(f"removed {stale}: an unfinished save of an interrupted run")
            for path in earlier:
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink()
        self.runtime.barrier()

    def _restore(self, folder: Path) -> None:
        state = restore_run_checkpoint(folder, self.model, self.optimizer)
        self.scheduler.load_state_dict(state["scheduler"])
        self.loader.load_state_dict(state["data"])
        self.step = state["step"]
        self.updater.skipped_updates = state["skipped_updates"]
        self.echo(f"resumed from {folder} at step {self.step}")

    # ------------------------------------------------------------- the loop
    def train(self) -> TrainSummary:
        config = self.config
        self.echo(dump_config(config).rstrip())
        if self.runtime.is_main:
            (self.output_dir / "config.yaml").write_text(dump_config(config))
        self.echo(self._describe_run())
        progress = tqdm(total=config.train.steps, initial=self.step, desc="gspo", unit="step", dynamic_ncols=True,
                        disable=not self.runtime.is_main)
        try:
            while self.step < config.train.steps:
                try:
                    record = self.train_step()
                except TrainingError as error:
                    raise TrainingError(f"step {self.step + 1}: {error} "
                                        f"The last checkpoint in {self.output_dir} is intact.") from None
                self.step += 1
                progress.update(1)
                if self.metrics is not None:
                    self.metrics.log(self.step, record)
                if self.runtime.is_main and (self.step % config.logging.every == 0 or self.step == config.train.steps):
                    progress.write(console_line(self.step, record))
                every = config.checkpoint.every
                if every and self.step % every == 0 and self.step < config.train.steps:
                    self.save_checkpoint()
        except KeyboardInterrupt:
            raise TrainingInterrupted(self._interrupted_message()) from None
        finally:
            progress.close()
        final_dir = self.output_dir / "final"
        save_model(self.model, final_dir, self.runtime, self.lora)
        records = []
        if self.metrics is not None:
            self.metrics.close()
            records = self.metrics.records()
        return summarize(records, self.skipped_updates, self.output_dir, final_dir)

    def train_step(self) -> dict:
        config, runtime, group = self.config, self.runtime, self.config.rollout.group_size
        step_start = time.perf_counter()
        # Every rank reads the same global batch and takes prompts rank, rank + N, rank + 2N, ...:
        # the minibatches, split on each rank, add up to those of one process with the whole batch.
        global_examples = next(self.loader)
        indices = list(range(runtime.rank, len(global_examples), runtime.world_size))
        examples = [global_examples[index] for index in indices]

        # 1. rollout (a prompt's image features are computed once here, for its whole group and the update)
        prompts = [example.token_ids for example in examples for _ in range(group)]
        visions = self.prompt_visions(examples)
        out = self.rollout(prompts, sample_ids=[index * group + j for index in indices for j in range(group)],
                           vision=[v for v in visions for _ in range(group)] if any(visions) else None)
        rollout_s = time.perf_counter() - step_start

        # 2. rewards and advantages
        completions = self.tokenizer.batch_decode(out.tokens, skip_special_tokens=True)
        prompt_texts, columns = reward_inputs(examples, group)
        scored = self.rewards(completions, prompt_texts, columns)
        rewards = torch.tensor(scored.total, dtype=torch.float32)
        advantages = group_advantages(rewards, group, config.gspo.advantage_scale, config.gspo.advantage_eps)
        samples = [
            Sample(prompt_ids=list(prompt), completion_ids=list(out.tokens[i]), advantage=float(advantages.values[i]),
                   rollout_logps=out.logps[i], reward=float(rewards[i]),
                   old_routing=out.routing[i] if out.routing is not None else None, vision=visions[i // group])
            for i, prompt in enumerate(prompts)
        ]

        # 3. old (and reference) log-probs
        update_start = time.perf_counter()
        if config.gspo.old_logps == "recompute":
            score_samples(self.context, self.model, samples, "old_logps", record_routing=self.updater.routing_replay)
        else:
            for sample in samples:
                sample.old_logps = sample.rollout_logps
        if config.gspo.beta > 0:
            score_reference(self.context, self.model, self.reference, samples)

        # 4. update, one optimizer step per minibatch
        update = self.updater.run(samples)
        self.scheduler.step()
        update_s = time.perf_counter() - update_start

        # 5. metrics of the whole batch, from every rank's share
        scored_positions = sum(s.num_positions for s in samples) * (2 if config.gspo.old_logps == "recompute" else 1)
        share = RankShare(
            rewards=rewards.tolist(), per_reward=scored.per_reward, failures=sum(scored.failures.values()),
            constant_groups=advantages.constant_groups, rollout_tokens=sum(len(t) for t in out.tokens),
            update_tokens=scored_positions, finished=sum(out.finished), rollout_s=rollout_s, update_s=update_s,
            step_s=time.perf_counter() - step_start, peak_memory_mib=peak_memory_mib(self.device),
            rollout_active_mean=out.active_mean, rollout_active_min=out.active_min,
            kv_cache_mib=out.kv_cache_bytes / 2**20, kv_cache_use=out.kv_cache_use,
        )
        record = combine_ranks(runtime.gather(share.as_dict())) | update
        record |= {"lr": self.scheduler.get_last_lr()[0], "skipped_updates": self.skipped_updates}
        every = config.logging.sample_every
        if every and (self.step + 1) % every == 0:
            self.echo(f"sample: {prompt_texts[0]!r} -> {completions[0]!r} (reward {rewards[0]:.3f})")
        return record

    def prompt_visions(self, examples) -> list:
        """Per example, the model.qwen3_vl.PromptVision of its images and audio (features without gradients,
        multimodal positions), or None for a prompt without either."""
        if not any(example.images or example.audio for example in examples):
            return [None] * len(examples)
        out = []
        self.model.eval()
        with torch.no_grad(), self.context.autocast(), \
                gathered_weights(self.model, self.config.distributed.reshard_after_forward):
            for example in examples:
                if not example.images and not example.audio:
                    out.append(None)
                    continue
                where = f"prompt {example.index}"
                inputs = None if not example.images else self.images.inputs(
                    [self.images.open(source, where, None) for source in example.images])
                if not example.audio:
                    out.append(self.model.prompt_vision(torch.tensor(example.token_ids), inputs))
                    continue
                audios = self.audio.inputs([self.audio.open(source, where, None) for source in example.audio])
                out.append(self.model.prompt_vision(torch.tensor(example.token_ids), inputs, audios=audios))
        return out

    def rollout(self, prompts: list[list[int]], sample_ids: list[int], vision: list | None = None) -> Generation:
        """Completions of `prompts`, drawn under keys of their place in the global batch (sample_ids):
        the same tokens on any number of ranks. vision: per prompt its PromptVision or None (images)."""
        rollout = self.config.rollout
        self.model.eval()
        with torch.no_grad(), self.context.autocast(), \
                gathered_weights(self.model, self.config.distributed.reshard_after_forward):
            out = generate(
                self.model, prompts, max_new_tokens=rollout.max_new_tokens, temperature=rollout.temperature,
                top_p=rollout.top_p, top_k=rollout.top_k, eos_token_id=self.eos_ids,
                seed=self.config.train.seed * 1_000_003 + self.step, sample_ids=sample_ids,
                kv_cache_gb=self.kv_cache_gb, vision=vision,
                # Routing replay of the sampler's own experts when its log-probs are the old ones.
                return_routing=self.updater.routing_replay and self.config.gspo.old_logps == "rollout",
            )
            # Expert parallelism: this rank's experts serve the peers still generating.
            finish_in_step(self.model)
        return out

    # ------------------------------------------------------------ outputs
    def save_checkpoint(self) -> Path:
        state = {"scheduler": self.scheduler.state_dict(), "data": self.loader.state_dict(), "step": self.step,
                 "skipped_updates": self.skipped_updates}
        path = save_run_checkpoint(self.output_dir, self.step, self.model, self.optimizer, state,
                                   self.config.checkpoint.keep_last, self.runtime, self.lora)
        logger.info("saved %s", path)
        return path

    def _interrupted_message(self) -> str:
        found = list_checkpoints(self.output_dir)
        if not found:
            return (f"interrupted at step {self.step + 1} of {self.config.train.steps}; no checkpoint was written yet "
                    f"(checkpoint.every = {self.config.checkpoint.every})")
        return (f"interrupted at step {self.step + 1} of {self.config.train.steps}; the last checkpoint is "
                f"{found[-1]}: continue from it with the same command and --resume")

    def _describe_run(self) -> str:
        total = sum(p.numel() for p in self.model.parameters())
        trained = "" if self.lora is None else (
            f", LoRA rank {self.lora.rank}: {sum(p.numel() for p in adapter_parameters(self.model)) / 1e6:.3f}M trained"
        )
        ranks = f" x {self.runtime.world_size} ranks (FSDP2)" if self.runtime.distributed else ""
        if self.config.distributed.expert_parallel > 1 and self.runtime.world_size > 1:
            ranks += f", experts split over groups of {self.config.distributed.expert_parallel}"
        return (
            f"model {self.source} ({total / 1e6:.2f}M parameters{trained}, "
            f"{'MoE' if self.model.args.is_moe else 'dense'}) on {self.device}{ranks}, precision {self.precision}; "
            f"{len(self.dataset)} prompts ({self.dataset.num_skipped} skipped as too long)"
        )
