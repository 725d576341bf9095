"""The `gspo-engine` command line."""

from __future__ import annotations

import json

import click

from gspo_engine import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="gspo-engine")
def main() -> None:
    """GSPO reinforcement-learning fine-tuning of Qwen3 models."""


@main.command()
@click.option("--kernel", "families", multiple=True, type=click.Choice(["loss", "fused-linear", "moe", "gated-deltanet", "e2e"]),
              help="Family to compare (repeatable; default: all).")
@click.option("--device", default=None, help="cpu or cuda (default: cuda when present).")
@click.option("--rounds", default=10, show_default=True, type=click.IntRange(1), help="Timed calls per case (at most).")
@click.option("--scale", type=click.Choice(["gpu", "cpu", "smoke"]), default=None,
              help="Shape set (default: gpu on cuda, cpu otherwise; smoke runs in seconds).")
@click.option("--json", "as_json", is_flag=True, help="One JSON row per line, as each case ends, instead of a table.")
def bench(families: tuple[str, ...], device: str | None, rounds: int, scale: str | None, as_json: bool) -> None:
    """Time ours side by side with the PyTorch reference, transformers and installed peers."""
    import torch

    from gspo_engine.benchmarks import FAMILIES, default_scale, markdown_table, run_benchmarks
    from gspo_engine.benchmarks.timing import ceilings

    target = _device(device)
    if target.type == "cpu":
        torch.set_num_threads(1)  # threads of a shared CPU wait on each other and make the ratios swing
    rows = run_benchmarks(list(families) or list(FAMILIES), target, rounds, scale or default_scale(target),
                          ceilings(target))
    if not as_json:
        click.echo("\n".join(markdown_table(list(rows))))
        return
    for row in rows:
        click.echo(json.dumps(row))


# Config files that were renamed to say which model they hold: the old path still works, with a notice.
RENAMED_CONFIGS = {"gspo_qwen3_moe.yaml": "gspo_qwen3_235b_a22b.yaml"}


def _config_path(path: str | None) -> str | None:
    from pathlib import Path

    if path is None or Path(path).exists() or Path(path).name not in RENAMED_CONFIGS:
        return path
    renamed = Path(path).with_name(RENAMED_CONFIGS[Path(path).name])
    if not renamed.exists():
        return path
    click.echo(f"note: {path} is now {renamed}; the old name will stop working in a later release", err=True)
    return str(renamed)


def _device(name: str | None):
    from gspo_engine.device import DeviceError, resolve_device

    try:
        return resolve_device(name)
    except DeviceError as error:
        raise click.BadParameter(str(error), param_hint="--device") from error


def _plan_lines(config, gpus: int, gpu_memory_gb: float, device: str = "GPU") -> list[str]:
    from gspo_engine.planner import make_plan

    try:
        plan = make_plan(config, gpus=gpus, gpu_memory_gb=gpu_memory_gb, device=device)
    except ValueError as error:
        raise click.ClickException(str(error)) from error
    return ["", "plan:"] + [f"  {line}" for line in plan.lines()]


@main.command()
@click.argument("config_path", type=click.Path(dir_okay=False))
@click.option("--gpus", default=1, show_default=True, type=click.IntRange(1),
              help="GPUs the run shards over (torchrun ranks, FSDP2 data parallel).")
@click.option("--gpu-memory-gb", default=80.0, show_default=True, type=click.FloatRange(0, min_open=True),
              help="Memory of one GPU in GB (10^9 bytes): 80 for an 80 GB card.")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
              help="Override one config key (repeatable).")
def plan(config_path, gpus, gpu_memory_gb, overrides) -> None:
    """Memory per GPU of a config on N GPUs, phase by phase, and the largest micro-batch that fits.

    gspo-engine plan configs/moe.yaml --gpus 8 --gpu-memory-gb 80. Reads config.json only (or the
    shapes of a released Qwen3 model); see docs/planner.md for what is counted.
    """
    from gspo_engine.config import ConfigError, load_config

    try:
        config = load_config(_config_path(config_path), list(overrides))
    except ConfigError as error:
        raise click.ClickException(str(error)) from error
    lines = _plan_lines(config, gpus, gpu_memory_gb)
    click.echo("\n".join([f"{config_path} on {gpus} x {gpu_memory_gb:g} GB GPUs"] + lines))


# Familiar flags of other trainers, mapped onto config keys.
_FLAG_KEYS = {
    "model_name_or_path": "model.name_or_path",
    "dataset": "data.dataset",
    "gspo_group_size": "rollout.group_size",
    "learning_rate": "optim.learning_rate",
    "output_dir": "output_dir",
    "cutoff_len": "data.max_prompt_tokens",
    "lora_rank": "lora.rank",
    "overwrite_output_dir": "overwrite_output_dir",
    "freeze_vision_tower": "model.freeze_vision_tower",
    "vision_resolution": "data.vision_resolution",
}


@main.command()
@click.argument("config_path", required=False, type=click.Path(dir_okay=False))
@click.option("--config", "config_option", type=click.Path(dir_okay=False), help="The YAML config (same as CONFIG).")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE", help="Override one config key (repeatable).")
@click.option("--model_name_or_path",
              help="Model folder (config.json + safetensors), Hub id ORG/NAME[@REVISION], or tiny-moe / tiny-dense / "
                   "tiny-next / tiny-vl / tiny-omni.")
@click.option("--dataset", help="Local JSONL / JSON / parquet file, save_to_disk folder, Hub dataset NAME[:SPLIT], "
                                "or builtin.")
@click.option("--gspo_group_size", type=int, help="Completions sampled per prompt.")
@click.option("--learning_rate", type=float, help="AdamW learning rate.")
@click.option("--output_dir", help="Where metrics, checkpoints and the final model go.")
@click.option("--cutoff_len", type=int, help="Longest prompt in tokens (longer ones are skipped and counted).")
@click.option("--stage", default="gspo", show_default=True, help="Training stage; only gspo exists.")
@click.option("--lora_rank", type=int, help="Train rank-N LoRA adapters instead of every weight (lora.rank).")
@click.option("--freeze_vision_tower", type=click.BOOL, default=None,
              help="Qwen3-VL: true keeps the vision tower fixed (the default), false trains it.")
@click.option("--vision_resolution", type=click.IntRange(1), default=None,
              help="Qwen3-VL: images at most N x N pixels (data.vision_resolution).")
@click.option("--overwrite_output_dir", is_flag=True, default=None,
              help="Start over in an output_dir that holds an earlier run, replacing its outputs.")
@click.option("--resume", is_flag=True, help="Continue from the latest checkpoint in output_dir.")
@click.option("--dry-run", is_flag=True, help="Validate the config and print the plan without loading weights.")
@click.option("--gpus", type=click.IntRange(1), default=None,
              help="With --dry-run: plan for this many GPUs (default: the machine the run would use).")
@click.option("--gpu-memory-gb", type=click.FloatRange(0, min_open=True), default=None,
              help="With --dry-run: memory of one planned GPU in GB (default: the machine's).")
def train(config_path, config_option, overrides, stage, resume, dry_run, gpus, gpu_memory_gb, **flags) -> None:
    """Train a Qwen3 model with GSPO: gspo-engine train configs/tiny-moe.yaml"""
    import logging

    from gspo_engine.config import ConfigError, load_config

    if config_path and config_option and config_path != config_option:
        raise click.UsageError(f"two configs given: {config_path} and --config {config_option}")
    if not (config_path or config_option):
        raise click.UsageError("give a config: gspo-engine train configs/tiny-moe.yaml trains the embedded tiny "
                               "default; configs/ holds the others")
    if stage != "gspo":
        raise click.BadParameter(f"{stage!r} is not a stage of gspo-engine; the only stage is gspo", param_hint="--stage")
    assignments = [f"{_FLAG_KEYS[name]}={value}" for name, value in flags.items() if value is not None]
    if resume:
        assignments.append("checkpoint.resume=auto")
    try:
        config = load_config(_config_path(config_path or config_option), assignments + list(overrides))
    except ConfigError as error:
        raise click.ClickException(str(error)) from error

    if dry_run:
        import os

        from gspo_engine.config import dump_config

        dataset_problem = None
        if config.data.dataset != "builtin":
            from gspo_engine.data import DataError, dataset_source

            try:
                dataset_source(config.data.dataset)  # a Hub dataset is not looked up: a dry run reads nothing
            except DataError as error:
                dataset_problem = f"data.dataset: {error}"
        click.echo(dump_config(config).rstrip())
        # Under torchrun the dry run plans the ranks it was launched with; `gspo-engine plan` takes any.
        world_size = os.environ.get("WORLD_SIZE", "1")
        if not world_size.isdigit() or int(world_size) < 1:
            raise click.ClickException(f"WORLD_SIZE={world_size!r} is not a number of processes")
        from gspo_engine.device import DeviceError
        from gspo_engine.planner.machine import machine_for

        try:
            machine = machine_for(config, int(world_size), gpus, gpu_memory_gb)
        except DeviceError as error:
            raise click.ClickException(f"train.device: {error}") from error
        click.echo(f"\n{machine.description}")
        click.echo("\n".join(_plan_lines(machine.config, machine.count, machine.memory_gb, machine.device)))
        if dataset_problem:
            # The plan does not depend on the prompts; the run would stop at them.
            raise click.ClickException(f"{dataset_problem} (the plan above holds; pass --dataset to run)")
        return
    if gpus is not None or gpu_memory_gb is not None:
        raise click.UsageError("--gpus and --gpu-memory-gb plan a dry run: add --dry-run, or use gspo-engine plan")

    import os

    from gspo_engine.trainer import GSPOTrainer, TrainingError, TrainingInterrupted

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    rank = os.environ.get("RANK") if "WORLD_SIZE" in os.environ else None
    try:
        summary = GSPOTrainer(config, echo=click.echo).train()
    except TrainingInterrupted as error:
        if rank in (None, "0"):
            click.echo(f"\n{error}", err=True)
        raise SystemExit(130) from None
    except (TrainingError, ValueError, FileNotFoundError) as error:
        raise click.ClickException(str(error) if rank is None else f"rank {rank}: {error}") from error
    except RuntimeError as error:
        if rank is None:
            raise
        # A collective that failed: a peer died (the connection closed) or hung past the timeout.
        raise click.ClickException(
            f"rank {rank}: distributed training stopped: {error}\n"
            f"A rank died or stopped answering (distributed.timeout_s = {config.distributed.timeout_s:g} s). "
            f"The latest complete checkpoint in {config.output_dir} is intact; resume with --resume."
        ) from error
    if rank not in (None, "0"):
        return
    rise = summary.last_reward_mean - summary.first_reward_mean
    # A ratio to a mean reward of 0 (or below) says nothing: the difference alone is shown then.
    ratio = f", x{summary.last_reward_mean / summary.first_reward_mean:.2f}" if summary.first_reward_mean > 0 else ""
    click.echo(
        f"\ndone: {summary.steps} steps; mean reward of the first {summary.window} steps "
        f"{summary.first_reward_mean:.3f}, of the last {summary.window} {summary.last_reward_mean:.3f} "
        f"({rise:+.3f}{ratio}); "
        f"skipped updates {summary.skipped_updates}\n"
        f"final model: {summary.final_dir}\nmetrics: {summary.output_dir / 'metrics.jsonl'}, "
        f"curves: {summary.output_dir / 'curves.png'}"
    )


@main.command()
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--prompt", "prompts", multiple=True, required=True, help="Prompt text (repeatable).")
@click.option("--chat", is_flag=True, help="Wrap each prompt in the tokenizer's chat template.")
@click.option("--max-new-tokens", default=64, show_default=True, type=click.IntRange(1))
@click.option("--temperature", default=0.7, show_default=True, type=click.FloatRange(0), help="0 is greedy.")
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0, 1, min_open=True))
@click.option("--top-k", default=0, show_default=True, type=click.IntRange(0))
@click.option("--samples", default=1, show_default=True, type=click.IntRange(1), help="Completions per prompt.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--device", default=None, help="cpu or cuda (default: cuda when present).")
@click.option("--image", "images", multiple=True, type=click.Path(),
              help="Qwen3-VL: an image every prompt shows (repeatable), at its <image> marks or before its text.")
@click.option("--audio", "audio", multiple=True, type=click.Path(),
              help="Qwen3-Omni: a WAV / FLAC file every prompt plays (repeatable), at its <audio> marks or before "
                   "its text.")
def generate(model_dir, prompts, chat, max_new_tokens, temperature, top_p, top_k, samples, seed, device,
             images, audio) -> None:
    """Sample completions from a checkpoint or LoRA adapter folder (e.g. OUTPUT_DIR/final)."""
    from pathlib import Path

    import torch

    from gspo_engine.hf_checkpoint import load_pretrained
    from gspo_engine.lora import is_adapter_folder, load_adapted, merge_lora
    from gspo_engine.rollout import generate as sample
    from gspo_engine.tokenizer import eos_token_ids, load_tokenizer, render_prompt

    target = _device(device)
    tokenizer = load_tokenizer(model_dir)
    dtype = torch.bfloat16 if target.type == "cuda" else torch.float32
    if is_adapter_folder(model_dir):  # a LoRA run's output: its base model with the adapters merged
        model = merge_lora(load_adapted(model_dir, dtype=dtype, device=target)).eval()
    else:
        model = load_pretrained(model_dir, dtype=dtype, device=target).eval()
    vision = None
    if images or audio:
        vision_prompts, vision = _media_prompts(model, model_dir, tokenizer, prompts, images, audio)
        texts = [render_prompt(tokenizer, prompt, chat_template=chat) for prompt in vision_prompts]
    else:
        texts = [render_prompt(tokenizer, prompt, chat_template=chat) for prompt in prompts]
    prompt_ids = [tokenizer(text, add_special_tokens=not chat)["input_ids"] for text in texts]
    visions = None
    if vision is not None:
        prompt_ids, visions = vision(prompt_ids)
        visions = [v for v in visions for _ in range(samples)]
    ids = [token_ids for token_ids in prompt_ids for _ in range(samples)]
    with torch.no_grad():
        out = sample(model, ids, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                     eos_token_id=eos_token_ids(Path(model_dir), tokenizer), seed=seed, vision=visions)
    for index, tokens in enumerate(out.tokens):
        prompt = prompts[index // samples]
        completion = tokenizer.decode(tokens, skip_special_tokens=True)
        click.echo(f"[{index}] {prompt!r} -> {completion!r}{'' if out.finished[index] else ' (cut at max-new-tokens)'}")


def _media_prompts(model, model_dir, tokenizer, prompts, images, audio):
    """The prompts with places for the images and audio, and a function from their token ids to the ids with the
    images' and audio's tokens and each prompt's PromptVision."""
    from pathlib import Path

    import torch

    from gspo_engine.audio_prompts import AudioError, AudioProcessing, expand_audio_pads, with_audio_places
    from gspo_engine.vision_prompts import ImageError, ImageProcessing, expand_image_pads, with_image_places

    if images and model.args.vision is None:
        raise click.ClickException(f"--image needs a Qwen3-VL or Qwen3-Omni model; {model_dir} has no vision tower")
    if audio and model.args.audio is None:
        raise click.ClickException(f"--audio needs a Qwen3-Omni model; {model_dir} has no audio encoder")
    inputs = audios = None
    placed = list(prompts)
    try:
        if images:
            processing = ImageProcessing(model_dir, model.args.vision)
            inputs = processing.inputs([processing.open(path, "--image", Path.cwd()) for path in images])
            image_counts = processing.token_counts(inputs)
            placed = [with_image_places(prompt, len(images), "--prompt") for prompt in placed]
        if audio:
            hearing = AudioProcessing(model_dir, model.args.audio, tokenizer)
            audios = hearing.inputs([hearing.open(path, "--audio", Path.cwd()) for path in audio])
            audio_counts = hearing.token_counts(audios)
            placed = [with_audio_places(prompt, len(audio), hearing.place, "--prompt") for prompt in placed]
    except (ImageError, AudioError) as error:
        raise click.ClickException(str(error)) from error

    def with_media(prompt_ids):
        try:
            if images:
                prompt_ids = [expand_image_pads(ids, image_counts, model.args.vision, "--prompt") for ids in prompt_ids]
            if audio:
                prompt_ids = [expand_audio_pads(ids, audio_counts, model.args.audio, "--prompt") for ids in prompt_ids]
        except (ImageError, AudioError) as error:
            raise click.ClickException(str(error)) from error
        extra = {} if audios is None else {"audios": audios}
        with torch.no_grad():
            return prompt_ids, [model.prompt_vision(torch.tensor(ids), inputs, **extra) for ids in prompt_ids]

    return placed, with_media


@main.command()
@click.argument("source", type=click.Path(exists=True, file_okay=False))
@click.option("--output", required=True, type=click.Path(file_okay=False), help="Folder to write.")
@click.option("--merge", is_flag=True, help="Fold LoRA adapters into their base: a plain Hugging Face checkpoint.")
@click.option("--force", is_flag=True, help="Replace what --output holds (never the folder exported from).")
@click.option("--push-to-hub", "push_to_hub", metavar="ORG/NAME",
              help="Then upload the exported folder to this Hugging Face model repository (created private).")
@click.option("--public", is_flag=True, help="With --push-to-hub: create the repository public.")
def export(source, output, merge, force, push_to_hub, public) -> None:
    """Export the model of a checkpoint folder, or of a run folder (its final/ or latest checkpoint).

    A LoRA run's adapters are copied as a PEFT adapter folder, or with --merge merged into their
    base model and written as a Hugging Face checkpoint; full weights are written as one.
    --push-to-hub uploads the result (log in first: hf auth login, or set HF_TOKEN).
    """
    from gspo_engine.export import export_model
    from gspo_engine.hub import HubError, check_push_target, push_folder

    if public and not push_to_hub:
        raise click.UsageError("--public sets the visibility of a --push-to-hub repository; add --push-to-hub")
    try:
        if push_to_hub:
            check_push_target(push_to_hub)  # before the export, which may take a while
        folder = export_model(source, output, merge, force=force)
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        raise click.ClickException(str(error)) from error
    click.echo(f"exported {folder} to {output}")
    if push_to_hub:
        try:
            url = push_folder(output, push_to_hub, private=not public)
        except HubError as error:
            raise click.ClickException(str(error)) from error
        click.echo(f"pushed {output} to {push_to_hub} ({'public' if public else 'private'}): {url}")
