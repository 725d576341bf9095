"""Training configuration: YAML -> typed dataclasses, validated with messages that name the key.

Every section is a dataclass whose fields carry their defaults; `Literal` fields list the
valid choices. `load_config(path, overrides)` reads YAML, applies `section.key=value`
overrides, and checks unknown keys, types and value ranges before anything is built.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key and what it accepts."""


@dataclass
class ModelConfig:
    # A Hugging Face Qwen3 / Qwen3-MoE folder (config.json, safetensors, tokenizer files), a Hub id
    # ORG/NAME[@REVISION] (downloaded into the Hugging Face cache; a local folder of that name wins), or
    # "tiny-moe" / "tiny-dense" / "tiny-next" / "tiny-vl" / "tiny-omni": a small random model built on the fly with the
    # tiny tokenizer.
    name_or_path: str = "tiny-moe"
    # A Hub branch, tag or commit of name_or_path (or write ORG/NAME@REVISION). A run's config.yaml records
    # the commit it read here, and the folder it read in resolved_folder, which is only a record: a run
    # started from that config.yaml resolves name_or_path at that commit again.
    revision: str | None = None
    resolved_folder: str | None = None
    seed: int = 0  # initialisation of the tiny random models
    activation_checkpointing: bool = False
    # Routing replay: record the experts the rollout chose and reuse them in the update.
    # GSPO does not need it; it is here for comparison with token-level GRPO.
    routing_replay: bool = False
    router_aux_loss_coef: float = 0.0  # Switch load-balancing loss; 0 leaves it off
    # Qwen3-VL: keep the vision tower and its mergers as they are (no gradients, no optimizer state; their
    # features for a prompt are computed once per step and reused by all its completions), or train them.
    freeze_vision_tower: bool = True


# The generated digit tasks (gspo_engine/builtin_tasks.py solves each; the tiny tokenizer has a token per name).
BUILTIN_TASKS = ("copy", "reverse", "sort")
# The generated image tasks (gspo_engine/vision_task.py) of data.dataset builtin_vision, for the tiny-vl model.
VISION_TASKS = ("colour", "count")
# The synthesised audio tasks (gspo_engine/audio_task.py) of data.dataset builtin_audio, for the tiny-omni model.
AUDIO_TASKS = ("pitch", "beeps")


@dataclass
class BuiltinTasksConfig:
    """The generated digit tasks of the tiny default (gspo_engine/builtin_tasks.py)."""

    tasks: list[str] = field(default_factory=lambda: list(BUILTIN_TASKS))
    min_length: int = 2
    max_length: int = 4
    num_digits: int = 10  # how many distinct digits appear (2..10)
    num_rows: int = 4096  # prompts generated from data.seed


@dataclass
class DataConfig:
    # A local JSONL / JSON / parquet file with a prompt column, a folder written by datasets'
    # save_to_disk (FOLDER or FOLDER:SPLIT), a Hub dataset (NAME, ORG/NAME, NAME:SPLIT; split "train" by
    # default), or "builtin" for the generated digit tasks of the tiny default (rewarded by digit_match
    # unless rewards says otherwise), or "builtin_vision" for the generated image tasks of tiny-vl (the same), or
    # "builtin_audio" for the synthesised audio tasks of tiny-omni (the same).
    dataset: str = "builtin"
    subset: str | None = None  # a Hub dataset's configuration (load_dataset's name), e.g. "main" of openai/gsm8k
    prompt_column: str = "prompt"
    max_prompt_tokens: int = 512  # longer prompts are skipped and counted, never cut
    chat_template: bool = False  # apply the tokenizer's chat template to string prompts
    enable_thinking: bool | None = None  # passed to Qwen3's chat template; None keeps its default
    seed: int = 0  # generated rows and shuffling order
    builtin: BuiltinTasksConfig = field(default_factory=BuiltinTasksConfig)
    # Prompts with images (Qwen3-VL): an image is resized to at most vision_resolution^2 pixels and at least
    # vision_min_resolution^2 (aspect kept, sides multiples of the patch x merge size), which bounds its visual
    # tokens; None keeps the model's image processor settings.
    vision_resolution: int | None = None
    vision_min_resolution: int | None = None
    # Prompts with audio (Qwen3-Omni): a longer audio stops the run, naming it; None takes any length.
    max_audio_seconds: float | None = 60.0


@dataclass
class RolloutConfig:
    prompts_per_step: int = 8
    group_size: int = 8  # completions sampled per prompt
    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    # Bound on the rollout's KV cache, decimal GB: as many sequences as it holds run at once, the others
    # wait for a free slot. None: what the memory planner leaves free after weights, states and a margin.
    kv_cache_gb: float | None = None


@dataclass(frozen=True)
class RewardSpec:
    """One reward of the config: `function` is a registry name or `module.path:function`."""

    function: str
    weight: float = 1.0
    name: str | None = None  # what it is logged as; the function's spec by default
    options: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.name or self.function


@dataclass
class GSPOConfig:
    level: Literal["sequence", "sequence_token", "token"] = "sequence"
    eps_low: float = 3e-4  # the paper's clip range (section 5.1)
    eps_high: float = 4e-4
    beta: float = 0.0  # k3 KL to the initial policy; 0 keeps no reference model
    old_logps: Literal["recompute", "rollout"] = "recompute"
    num_minibatches: int = 4  # the paper splits each rollout batch in 4, so the ratio moves off 1
    advantage_scale: Literal["group", "batch", "none"] = "group"
    advantage_eps: float = 1e-6
    micro_batch_tokens: int = 8192  # tokens per forward/backward (padded: rows x longest row); accumulation covers the rest
    # Micro-batches of the update and of old/ref scoring concatenate their sequences into one row
    # with no padding (attention kept inside each sequence); false right-pads every row to the longest.
    packing: bool = True


@dataclass
class OptimConfig:
    learning_rate: float = 1e-6
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    max_grad_norm: float = 1.0
    warmup_steps: int = 0
    schedule: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: float = 0.0  # cosine floor, as a fraction of learning_rate


@dataclass
class TrainConfig:
    steps: int = 100
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # fp32: weights, optimizer states and compute in fp32 (what "auto" picks on a CPU).
    # bf16-mixed: fp32 master weights and AdamW states, bf16 compute under autocast (what "auto"
    # picks on a GPU): the update is as precise as fp32, the matmuls run on the tensor cores.
    precision: Literal["auto", "fp32", "bf16-mixed"] = "auto"
    max_consecutive_skips: int = 5  # non-finite updates in a row before the run stops
    # CPU threads for torch (0 keeps torch's default). Tiny models run fastest on one: their
    # matmuls are too small to split, and idle threads spinning beside other work cost more.
    cpu_threads: int = 0


@dataclass
class CheckpointConfig:
    every: int = 0  # steps between checkpoints; 0 saves only the final model
    keep_last: int = 2
    resume: str = "none"  # "none", "auto" (latest in output_dir) or a checkpoint folder


@dataclass
class DistributedConfig:
    """Runs launched by torchrun (WORLD_SIZE set); a plain process ignores this section."""

    # Seconds a rank waits in a collective before the run fails (a peer died or hangs). Rollouts
    # of different lengths make ranks wait for each other, so leave room for the longest one.
    timeout_s: float = 1800.0
    # FSDP2: free each block's gathered weights after its forward (and gather them again for the
    # backward). Off keeps them to the backward: less traffic, more memory.
    reshard_after_forward: bool = True
    # Expert parallelism (MoE models): the ranks form groups of this many, which split every MoE
    # layer's experts between them (E / N each, with their optimizer states); tokens travel to their
    # experts' ranks and back. A divisor of the number of ranks and of the experts; 1 is off (and a
    # plain process holds every expert, whatever this says).
    expert_parallel: int = 1


# Names of the weights LoRA can adapt (gspo_engine/lora): attention, dense MLP (and the shared expert of
# Qwen3-Next / Qwen3.5 MoE layers, whose projections have the same names), MoE router, grouped MoE experts,
# and the Gated DeltaNet projections of the hybrid models: Qwen3-Next's fused in_proj_qkvz / in_proj_ba,
# Qwen3.5's in_proj_qkv / in_proj_z / in_proj_b / in_proj_a, and out_proj. A target the model lacks is skipped.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "router", "experts",
                "in_proj_qkvz", "in_proj_ba", "in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj",
                "attn.qkv", "attn.proj", "mlp.linear_fc1", "mlp.linear_fc2")
# The vision tower's blocks (Qwen3-VL, Qwen3.5): attention's qkv / proj and the MLP's linear_fc1 / linear_fc2, named
# by the suffix PEFT matches (the mergers' linear_fc1 / fc2 and the patch embedding's proj are not adapted). Only a
# trained tower (model.freeze_vision_tower false) takes them; they are not in the default targets.
LORA_VISION_TARGETS = ("attn.qkv", "attn.proj", "mlp.linear_fc1", "mlp.linear_fc2")
# Modules LoRA can train whole beside the adapters (PEFT's modules_to_save).
LORA_MODULES_TO_SAVE = ("embed_tokens", "lm_head")


@dataclass
class LoraConfig:
    """Low-rank adapters instead of full fine-tuning: base weights frozen, only the adapters trained."""

    rank: int = 0  # 0 trains every weight (no LoRA)
    alpha: float | None = None  # the update is scaled by alpha / rank; None: 2 x rank, as LLaMA-Factory does
    dropout: float = 0.0  # on the input of the nn.Linear adapters (attention, dense MLP, router), not the experts
    # "experts" adapts both grouped MoE tensors (gate_up and down) with per-expert factors; the
    # router is left out by default: changing the routing is rarely what an RL run wants. So are the
    # Gated DeltaNet's per-head gates (in_proj_ba, in_proj_b, in_proj_a: its decay and write strength),
    # for the same reason; its q / k / v / z and output projections are adapted.
    targets: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "experts",
                                 "in_proj_qkvz", "in_proj_qkv", "in_proj_z", "out_proj"]
    )
    base_bf16: bool = False  # keep the frozen base weights in bf16 (half their memory); needs bf16-mixed
    # Modules trained whole (fp32 copies) beside the adapters, as PEFT's modules_to_save: the
    # adapters on the blocks cannot move the embeddings or the lm_head, which a random model or
    # new tokens need. A model that ties them (tie_word_embeddings) has one matrix: naming
    # either trains it in both places.
    modules_to_save: list[str] = field(default_factory=list)

    @property
    def scale_alpha(self) -> float:
        return self.alpha if self.alpha is not None else 2.0 * self.rank


@dataclass
class LoggingConfig:
    every: int = 1
    sample_every: int = 0  # print a sample completion every N steps; 0 never
    tensorboard: bool = False


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    rewards: list[RewardSpec] = field(default_factory=list)
    gspo: GSPOConfig = field(default_factory=GSPOConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    output_dir: str = "runs/gspo"
    # A fresh run refuses an output_dir that holds an earlier run's metrics, checkpoints or final/
    # model, unless this is set: then they are replaced.
    overwrite_output_dir: bool = False


# Value checks beyond the type, by dotted key: (predicate, what the key accepts).
_RULES: dict[str, tuple[typing.Callable[[Any], bool], str]] = {
    "rollout.prompts_per_step": (lambda v: v >= 1, "an integer >= 1"),
    "rollout.group_size": (lambda v: v >= 2, "an integer >= 2 (advantages compare completions of one prompt)"),
    "rollout.max_new_tokens": (lambda v: v >= 1, "an integer >= 1"),
    "rollout.temperature": (lambda v: v >= 0, "a number >= 0 (0 is greedy)"),
    "rollout.top_p": (lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "rollout.top_k": (lambda v: v >= 0, "an integer >= 0 (0 disables it)"),
    "rollout.kv_cache_gb": (lambda v: v is None or v > 0, "a number > 0 (decimal GB), or null for what the planner "
                            "leaves free"),
    "data.builtin.min_length": (lambda v: v >= 1, "an integer >= 1"),
    "data.builtin.num_digits": (lambda v: 2 <= v <= 10, "an integer in 2..10"),
    "data.builtin.num_rows": (lambda v: v >= 1, "an integer >= 1"),
    "data.max_prompt_tokens": (lambda v: v >= 1, "an integer >= 1"),
    "gspo.eps_low": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "gspo.eps_high": (lambda v: v >= 0, "a number >= 0"),
    "gspo.beta": (lambda v: v >= 0, "a number >= 0"),
    "gspo.num_minibatches": (lambda v: v >= 1, "an integer >= 1"),
    "gspo.advantage_eps": (lambda v: v > 0, "a number > 0"),
    "gspo.micro_batch_tokens": (lambda v: v >= 1, "an integer >= 1"),
    "optim.learning_rate": (lambda v: v > 0, "a number > 0"),
    "optim.weight_decay": (lambda v: v >= 0, "a number >= 0"),
    "optim.max_grad_norm": (lambda v: v > 0, "a number > 0"),
    "optim.warmup_steps": (lambda v: v >= 0, "an integer >= 0"),
    "optim.min_lr_ratio": (lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    "optim.eps": (lambda v: v > 0, "a number > 0"),
    "train.steps": (lambda v: v >= 1, "an integer >= 1"),
    "train.max_consecutive_skips": (lambda v: v >= 1, "an integer >= 1"),
    "train.cpu_threads": (lambda v: v >= 0, "an integer >= 0 (0 keeps torch's default)"),
    "checkpoint.every": (lambda v: v >= 0, "an integer >= 0"),
    "distributed.timeout_s": (lambda v: v > 0, "a number of seconds > 0"),
    "distributed.expert_parallel": (lambda v: v >= 1, "an integer >= 1 (ranks sharing out the experts; 1 is off)"),
    "checkpoint.keep_last": (lambda v: v >= 1, "an integer >= 1"),
    "logging.every": (lambda v: v >= 1, "an integer >= 1"),
    "logging.sample_every": (lambda v: v >= 0, "an integer >= 0"),
    "model.router_aux_loss_coef": (lambda v: v >= 0, "a number >= 0"),
    "lora.rank": (lambda v: v >= 0, "an integer >= 0 (0 trains every weight)"),
    "lora.alpha": (lambda v: v is None or v > 0, "a number > 0, or null for 2 x rank"),
    "lora.dropout": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
}


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(repr(choice) for choice in typing.get_args(hint))
    return getattr(hint, "__name__", str(hint)).replace("typing.", "")


def _convert(value: Any, hint: Any, key: str) -> Any:
    """`value` checked against (and, for dataclasses and tuples, built as) the type `hint`."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        if value not in typing.get_args(hint):
            raise ConfigError(f"{key}: {value!r} is not valid; choose {_type_name(hint)}")
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _convert(value, option, key)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0])
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        (item,) = typing.get_args(hint)
        return [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        items = typing.get_args(hint)
        if len(items) == 2 and items[1] is Ellipsis:
            if not isinstance(value, (list, tuple)):
                raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
            return tuple(_convert(v, items[0], f"{key}[{i}]") for i, v in enumerate(value))
        if not isinstance(value, (list, tuple)) or len(value) != len(items):
            raise ConfigError(f"{key}: expected a list of {len(items)} values, got {value!r}")
        return tuple(_convert(v, t, f"{key}[{i}]") for i, (v, t) in enumerate(zip(value, items)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        return dict(value)
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        # YAML 1.1 reads 1e-6 (no dot) as a string; people write it that way.
        try:
            return float(value)
        except ValueError:
            pass
    if hint is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {_type_name(hint)}, got {type(value).__name__} {value!r}")
    return value


def _build(cls: type, data: Any, prefix: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping of keys, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown key {where}{unknown[0]}; valid keys{' of ' + prefix if prefix else ''}: {', '.join(fields)}")
    values = {}
    for name, spec in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if name in data:
            values[name] = _convert(data[name], hints[name], key)
        elif spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{key} is required")
        if name in values and key in _RULES:
            check, accepts = _RULES[key]
            if not check(values[name]):
                raise ConfigError(f"{key}: {values[name]!r} is not valid; expected {accepts}")
    return cls(**values)


def _parse_scalar(text: str) -> Any:
    """A command-line value as YAML reads it: numbers, booleans, lists, or a plain string."""
    return yaml.safe_load(text) if text.strip() else ""


def apply_override(data: dict, assignment: str) -> None:
    """Apply one `section.key=value` to the raw YAML mapping."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} must look like section.key=value")
    dotted, text = assignment.split("=", 1)
    parts = dotted.strip().split(".")
    target = data
    for part in parts[:-1]:
        target = target.setdefault(part, {})
        if not isinstance(target, dict):
            raise ConfigError(f"override {assignment!r}: {part} is not a section")
    target[parts[-1]] = _parse_scalar(text)


def config_from_dict(data: dict, overrides: list[str] = ()) -> Config:
    data = dict(data or {})
    for assignment in overrides:
        apply_override(data, assignment)
    config = _build(Config, data, "")
    _check_consistency(config)
    return config


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """The Config of a YAML file (or the defaults when path is None), with overrides applied."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"{path} is not valid YAML: {error}") from error
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a mapping of sections, got {type(data).__name__}")
    return config_from_dict(data, overrides)


def _check_consistency(config: Config) -> None:
    batch = config.rollout.prompts_per_step * config.rollout.group_size
    if config.gspo.num_minibatches > batch:
        raise ConfigError(
            f"gspo.num_minibatches: {config.gspo.num_minibatches} minibatches for {batch} sequences per step "
            "(rollout.prompts_per_step x rollout.group_size); use at most that many"
        )
    builtin = config.data.builtin
    if builtin.max_length < builtin.min_length:
        raise ConfigError(f"data.builtin.max_length: {builtin.max_length} is below data.builtin.min_length {builtin.min_length}")
    # builtin_vision draws image tasks, builtin digit tasks; another dataset reads neither, but a name is still checked.
    valid_tasks = {"builtin": BUILTIN_TASKS, "builtin_vision": VISION_TASKS, "builtin_audio": AUDIO_TASKS}.get(
        config.data.dataset, BUILTIN_TASKS + VISION_TASKS + AUDIO_TASKS)
    unknown_tasks = sorted(set(builtin.tasks) - set(valid_tasks))
    if not builtin.tasks or unknown_tasks:
        raise ConfigError(
            f"data.builtin.tasks: {builtin.tasks} is not valid for data.dataset {config.data.dataset}; choose some "
            f"of {', '.join(valid_tasks)}"
        )
    data = config.data
    for key in ("vision_resolution", "vision_min_resolution"):
        if getattr(data, key) is not None and getattr(data, key) < 1:
            raise ConfigError(f"data.{key}: {getattr(data, key)} is not valid; expected a positive number of pixels")
    if data.vision_resolution and data.vision_min_resolution and data.vision_min_resolution > data.vision_resolution:
        raise ConfigError(f"data.vision_min_resolution: {data.vision_min_resolution} is above data.vision_resolution "
                          f"{data.vision_resolution}")
    if data.max_audio_seconds is not None and data.max_audio_seconds <= 0:
        raise ConfigError(f"data.max_audio_seconds: {data.max_audio_seconds} is not valid; expected a positive number "
                          "of seconds, or null for any length")
    if not config.rewards and config.data.dataset not in ("builtin", "builtin_vision", "builtin_audio"):
        raise ConfigError("rewards: a dataset other than a built-in task needs at least one reward")
    if config.gspo.old_logps == "rollout" and (config.rollout.top_k or config.rollout.top_p < 1):
        raise ConfigError(
            "gspo.old_logps: rollout takes the sampler's log-probs, which top_k / top_p filtering changes; "
            "use gspo.old_logps: recompute, or rollout.top_k: 0 and rollout.top_p: 1"
        )
    _check_lora(config)


def _check_lora(config: Config) -> None:
    lora = config.lora
    unknown = sorted(set(lora.targets) - set(LORA_TARGETS))
    if unknown or not lora.targets:
        raise ConfigError(f"lora.targets: {lora.targets} is not valid; choose some of {', '.join(LORA_TARGETS)}")
    tower = [target for target in lora.targets if target in LORA_VISION_TARGETS]
    if lora.rank and tower and config.model.freeze_vision_tower:
        raise ConfigError(f"lora.targets: {tower} adapt the vision tower, which model.freeze_vision_tower true keeps "
                          "frozen; set model.freeze_vision_tower false (--freeze_vision_tower false) to train it")
    unknown = sorted(set(lora.modules_to_save) - set(LORA_MODULES_TO_SAVE))
    if unknown:
        raise ConfigError(f"lora.modules_to_save: {lora.modules_to_save} is not valid; choose some of "
                          f"{', '.join(LORA_MODULES_TO_SAVE)}, or none")
    if lora.modules_to_save and not lora.rank:
        raise ConfigError("lora.modules_to_save: only with LoRA (lora.rank > 0); full fine-tuning trains every weight")
    if lora.base_bf16 and not lora.rank:
        raise ConfigError("lora.base_bf16: only with LoRA (lora.rank > 0); full fine-tuning keeps fp32 master weights")
    if lora.base_bf16 and config.train.precision == "fp32":
        raise ConfigError("lora.base_bf16: needs train.precision bf16-mixed (or auto on a GPU), not fp32")


def config_to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)


def dump_config(config: Config) -> str:
    """The resolved config as YAML, as it is printed at start and saved in the output folder."""
    return yaml.safe_dump(config_to_dict(config), sort_keys=False)
