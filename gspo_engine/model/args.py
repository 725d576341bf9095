"""Model arguments of Qwen3, Qwen3-MoE and the hybrid Qwen3-Next / Qwen3.5 text models, read from (and written
back to) Hugging Face config.json.

Released checkpoints and transformers 5 name some fields differently; both spellings are read:

    released (transformers 4)            transformers 5
    num_experts                          num_local_experts
    rope_theta, rope_scaling             rope_parameters {"rope_type", "rope_theta", ...}
    torch_dtype                          dtype

`to_hf_config` writes the released spelling, which every transformers version and vLLM read.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from gspo_engine.model.audio_args import AudioArgs
from gspo_engine.model.vision_args import VisionArgs

DENSE_ARCHITECTURE = "Qwen3ForCausalLM"
MOE_ARCHITECTURE = "Qwen3MoeForCausalLM"
# Hybrid models: Gated DeltaNet (linear attention) layers between gated full-attention layers.
NEXT_ARCHITECTURE = "Qwen3NextForCausalLM"  # fused in_proj_qkvz / in_proj_ba, MoE with a shared expert
QWEN3_5_ARCHITECTURE = "Qwen3_5ForCausalLM"  # split in_proj_qkv / z / b / a, dense MLP
QWEN3_5_MOE_ARCHITECTURE = "Qwen3_5MoeForCausalLM"  # split projections, MoE with a shared expert
HYBRID_ARCHITECTURES = (NEXT_ARCHITECTURE, QWEN3_5_ARCHITECTURE, QWEN3_5_MOE_ARCHITECTURE)
# Qwen3-Omni: the thinker (thinker_config: text, vision and audio configs) is the model; talker and code2wav are
# carried through checkpoints unchanged.
OMNI_ARCHITECTURE = "Qwen3OmniMoeForConditionalGeneration"
# Image-text checkpoints (released Qwen3.5 and Qwen3-VL): their language model is config.json's text_config,
# its tensors sit under model.language_model.; the vision tower (model.visual.*, vision_config) is read into
# the model too (VISION_ARCHITECTURES), and the rest of config.json is kept.
MULTIMODAL_ARCHITECTURES = {
    OMNI_ARCHITECTURE: MOE_ARCHITECTURE,
    "Qwen3_5ForConditionalGeneration": QWEN3_5_ARCHITECTURE,
    "Qwen3_5MoeForConditionalGeneration": QWEN3_5_MOE_ARCHITECTURE,
    "Qwen3VLForConditionalGeneration": DENSE_ARCHITECTURE,
    "Qwen3VLMoeForConditionalGeneration": MOE_ARCHITECTURE,
}
# Image-text models whose vision tower is part of the model (model/vision.py, model/qwen3_vl.py), with the
# model_type of their text_config.
VISION_ARCHITECTURES = {
    "Qwen3VLForConditionalGeneration": "qwen3_vl_text", "Qwen3VLMoeForConditionalGeneration": "qwen3_vl_moe_text",
    "Qwen3_5ForConditionalGeneration": "qwen3_5_text", "Qwen3_5MoeForConditionalGeneration": "qwen3_5_moe_text",
    OMNI_ARCHITECTURE: "qwen3_omni_moe_text",
}
SUPPORTED_ARCHITECTURES = (DENSE_ARCHITECTURE, MOE_ARCHITECTURE, *HYBRID_ARCHITECTURES, *MULTIMODAL_ARCHITECTURES)
_MODEL_TYPES = {
    "qwen3": DENSE_ARCHITECTURE, "qwen3_moe": MOE_ARCHITECTURE, "qwen3_next": NEXT_ARCHITECTURE,
    "qwen3_5_text": QWEN3_5_ARCHITECTURE, "qwen3_5_moe_text": QWEN3_5_MOE_ARCHITECTURE,
    "qwen3_5": "Qwen3_5ForConditionalGeneration", "qwen3_5_moe": "Qwen3_5MoeForConditionalGeneration",
    "qwen3_vl": "Qwen3VLForConditionalGeneration", "qwen3_vl_moe": "Qwen3VLMoeForConditionalGeneration",
    "qwen3_omni_moe": OMNI_ARCHITECTURE,
}
_ARCHITECTURE_TYPES = {architecture: model_type for model_type, architecture in _MODEL_TYPES.items()}
FULL_ATTENTION, LINEAR_ATTENTION = "full_attention", "linear_attention"
# What transformers' Qwen3NextConfig / Qwen3_5TextConfig take when config.json leaves a key out.
_HYBRID_DEFAULTS = {
    "full_attention_interval": 4, "partial_rotary_factor": 0.25, "linear_conv_kernel_dim": 4,
    "linear_key_head_dim": 128, "linear_value_head_dim": 128, "linear_num_key_heads": 16,
    "linear_num_value_heads": 32,
}
ROPE_TYPES = ("default", "linear", "dynamic", "yarn")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Keys this module interprets, in either spelling. Everything else in a source config.json
# (token ids, initializer_range, use_cache, ...) is carried through to the saved one untouched.
_OWN_KEYS = {
    "architectures", "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings",
    "rms_norm_eps", "tie_word_embeddings", "attention_bias", "use_sliding_window", "sliding_window",
    "rope_theta", "rope_scaling", "rope_parameters", "torch_dtype", "dtype",
    "num_experts", "num_local_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob",
    "decoder_sparse_step", "mlp_only_layers", "router_aux_loss_coef",
    "layer_types", "full_attention_interval", "partial_rotary_factor", "linear_conv_kernel_dim",
    "linear_key_head_dim", "linear_value_head_dim", "linear_num_key_heads", "linear_num_value_heads",
    "shared_expert_intermediate_size",
}
_REQUIRED_KEYS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings",
)
_REQUIRED_MOE_KEYS = ("num_experts_per_tok", "moe_intermediate_size")
_REQUIRED_SHARED_EXPERT_KEYS = ("num_experts", "shared_expert_intermediate_size")


@dataclass
class RopeScaling:
    """RoPE frequency scaling of released configs: "linear", "dynamic" (NTK) or "yarn"."""

    rope_type: str
    factor: float
    original_max_position_embeddings: int | None = None  # yarn
    attention_factor: float | None = None  # yarn
    beta_fast: float | None = None  # yarn
    beta_slow: float | None = None  # yarn
    truncate: bool = True  # yarn


@dataclass
class ModelArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # dense MLP width, also of the dense layers of a MoE model
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    dtype: torch.dtype = torch.bfloat16  # of the weights: config.json's torch_dtype / dtype, or the one loaded in

    # MoE (num_experts == 0 for a dense model)
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    router_aux_loss_coef: float = 0.0

    # Hybrid models (architecture one of HYBRID_ARCHITECTURES). layer_types names each layer's token
    # mixer, FULL_ATTENTION or LINEAR_ATTENTION; empty for Qwen3, whose layers are all full attention.
    hf_architecture: str = ""  # the hybrid architecture; empty for Qwen3 / Qwen3-MoE (told apart by num_experts)
    layer_types: list[str] = field(default_factory=list)
    partial_rotary_factor: float = 1.0  # RoPE turns the first head_dim * factor dimensions of q and k
    linear_conv_kernel_dim: int = 0
    linear_key_head_dim: int = 0
    linear_value_head_dim: int = 0
    linear_num_key_heads: int = 0
    linear_num_value_heads: int = 0
    shared_expert_intermediate_size: int = 0  # the sigmoid-gated shared expert beside the routed ones
    # rope_parameters entries that only the multimodal Qwen3.5 reads (mrope_section, ...), written back.
    rope_extra: dict[str, Any] = field(default_factory=dict)
    # The config.json of a released image-text model (MULTIMODAL_ARCHITECTURES) around this language model,
    # less its text_config; empty for a text-only checkpoint.
    multimodal_config: dict[str, Any] = field(default_factory=dict, repr=False)
    # The vision tower of a Qwen3-VL model (VISION_ARCHITECTURES); None for a model without one.
    vision: VisionArgs | None = None
    # The audio encoder of a Qwen3-Omni thinker; None for a model without one.
    audio: AudioArgs | None = None

    # Runtime switches, never written to config.json; the model reads them at every forward.
    activation_checkpointing: bool = False
    router_aux_loss: bool = False  # add the Switch load-balancing loss to the model output
    source_path: str | None = None  # the folder the weights were loaded from; tokenizer files are copied from it
    # Checkpoint tensors the model does not use (mtp.*: multi-token prediction), copied from
    # source_path into every saved checkpoint so that it still serves speculative decoding.
    carried_keys: list[str] = field(default_factory=list)

    # Keys of the source config.json that the model does not interpret, written back on save.
    extra_config: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def architecture(self) -> str:
        if self.hf_architecture:
            return self.hf_architecture
        return MOE_ARCHITECTURE if self.is_moe else DENSE_ARCHITECTURE

    @property
    def hf_prefix(self) -> str:
        """Where the language model's tensors sit in the checkpoint (lm_head.weight aside)."""
        if self.audio is not None:
            return "thinker.model."
        return "model.language_model." if self.multimodal_config else "model."

    @property
    def hf_lm_head_key(self) -> str:
        return "thinker.lm_head.weight" if self.audio is not None else "lm_head.weight"

    @property
    def is_hybrid(self) -> bool:
        """Gated DeltaNet layers between gated attention ones (Qwen3-Next, Qwen3.5)."""
        return self.architecture in HYBRID_ARCHITECTURES

    @property
    def rotary_dim(self) -> int:
        """The leading dimensions of each q / k head that RoPE turns; the rest pass unchanged."""
        return int(self.head_dim * self.partial_rotary_factor)

    def is_linear_attention_layer(self, layer: int) -> bool:
        return bool(self.layer_types) and self.layer_types[layer] == LINEAR_ATTENTION

    @property
    def linear_attention_layers(self) -> list[int]:
        return [layer for layer in range(self.num_hidden_layers) if self.is_linear_attention_layer(layer)]

    def is_moe_layer(self, layer: int) -> bool:
        """Which layers are sparse, exactly as transformers' Qwen3MoeDecoderLayer decides."""
        return (
            self.is_moe
            and layer not in self.mlp_only_layers
            and (layer + 1) % self.decoder_sparse_step == 0
        )

    @property
    def moe_layers(self) -> list[int]:
        return [layer for layer in range(self.num_hidden_layers) if self.is_moe_layer(layer)]

    @classmethod
    def from_hf_config(cls, config: dict[str, Any]) -> "ModelArgs":
        """Arguments from a config.json dict, in either key spelling; ValueError on what is not supported."""
        architecture = _architecture(config)
        if architecture in MULTIMODAL_ARCHITECTURES:
            return cls._from_multimodal_config(architecture, config)
        missing = [key for key in _REQUIRED_KEYS if key not in config]
        if architecture != QWEN3_5_MOE_ARCHITECTURE and "intermediate_size" not in config:
            missing.append("intermediate_size")
        if architecture in (MOE_ARCHITECTURE, NEXT_ARCHITECTURE, QWEN3_5_MOE_ARCHITECTURE):
            missing += [key for key in _REQUIRED_MOE_KEYS if key not in config]
        if architecture in (NEXT_ARCHITECTURE, QWEN3_5_MOE_ARCHITECTURE):
            missing += [key for key in _REQUIRED_SHARED_EXPERT_KEYS if key not in config]
        if missing:
            raise ValueError(f"config.json lacks {', '.join(missing)}")
        hidden_size = config["hidden_size"]
        num_heads = config["num_attention_heads"]
        if config.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {config['hidden_act']!r}: Qwen3 models use 'silu'")
        if config.get("use_sliding_window", False):
            raise ValueError("use_sliding_window=true is not supported: Qwen3 checkpoints use full attention")
        rope_theta, rope_scaling = _rope(config)
        dtype_name = config.get("dtype") or config.get("torch_dtype") or "bfloat16"
        if dtype_name not in DTYPES:
            raise ValueError(f"unsupported dtype {dtype_name!r} in config.json; supported: {', '.join(DTYPES)}")
        args = cls(
            vocab_size=config["vocab_size"],
            hidden_size=hidden_size,
            intermediate_size=config.get("intermediate_size", 0),
            num_hidden_layers=config["num_hidden_layers"],
            num_attention_heads=num_heads,
            num_key_value_heads=config.get("num_key_value_heads") or num_heads,
            head_dim=config.get("head_dim") or hidden_size // num_heads,
            max_position_embeddings=config["max_position_embeddings"],
            rms_norm_eps=config.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            tie_word_embeddings=config.get("tie_word_embeddings", False),
            attention_bias=config.get("attention_bias", False),
            dtype=DTYPES[dtype_name],
            extra_config={k: v for k, v in config.items() if k not in _OWN_KEYS},
        )
        if num_heads % args.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({num_heads}) is not a multiple of num_key_value_heads "
                f"({args.num_key_value_heads})"
            )
        if architecture in HYBRID_ARCHITECTURES:
            _read_hybrid(args, architecture, config)
        if architecture == MOE_ARCHITECTURE:
            args.num_experts = config.get("num_experts", config.get("num_local_experts"))
            if not args.num_experts:
                raise ValueError("a Qwen3MoeForCausalLM config needs num_experts (or num_local_experts) > 0")
            args.num_experts_per_tok = config["num_experts_per_tok"]
            args.moe_intermediate_size = config["moe_intermediate_size"]
            args.norm_topk_prob = config.get("norm_topk_prob", False)
            args.decoder_sparse_step = config.get("decoder_sparse_step", 1)
            args.mlp_only_layers = list(config.get("mlp_only_layers") or [])
            args.router_aux_loss_coef = config.get("router_aux_loss_coef", 0.001)
        return args

    @classmethod
    def _from_multimodal_config(cls, architecture: str, config: dict[str, Any]) -> "ModelArgs":
        """The language model of a released image-text checkpoint, from its text_config."""
        outer = config
        if architecture == OMNI_ARCHITECTURE:
            if not isinstance(config.get("thinker_config"), dict):
                raise ValueError(f"a {architecture} config.json needs a thinker_config")
            # The weights' dtype is the whole model's; everything else is the thinker's.
            dtypes = {key: config[key] for key in ("dtype", "torch_dtype") if key in config}
            config = {**config["thinker_config"], **dtypes}
        if not isinstance(config.get("text_config"), dict):
            raise ValueError(f"a {architecture} config.json needs a text_config")
        text = dict(config["text_config"], architectures=[MULTIMODAL_ARCHITECTURES[architecture]])
        # The outer config decides what the whole model does: tied embeddings, the weights' dtype.
        for key in ("tie_word_embeddings", "dtype", "torch_dtype"):
            if key in config:
                text[key] = config[key]
        args = cls.from_hf_config(text)
        if architecture == OMNI_ARCHITECTURE:
            thinker = {key: value for key, value in outer["thinker_config"].items() if key != "text_config"}
            args.multimodal_config = dict(outer, thinker_config=thinker)
            args.audio = AudioArgs.from_hf_config(config)
        else:
            args.multimodal_config = {key: value for key, value in config.items() if key != "text_config"}
        if architecture in VISION_ARCHITECTURES:
            args.vision = VisionArgs.from_hf_config(config)
            if not args.is_hybrid:  # the hybrid models' rope_parameters extras (mrope_section, ...) are read already
                text_rope = dict(text.get("rope_parameters") or text.get("rope_scaling") or {})
                args.rope_extra = {key: text_rope[key] for key in ("mrope_section", "mrope_interleaved")
                                   if key in text_rope}
                if args.audio is not None:
                    args.norm_topk_prob = text.get("norm_topk_prob", True)  # Qwen3-Omni's default
                elif args.is_moe:
                    args.norm_topk_prob = True  # Qwen3-VL-MoE's router always renormalises its top-k weights
        return args

    def to_hf_config(self) -> dict[str, Any]:
        """config.json in the released spelling, with the source's other keys kept."""
        if self.multimodal_config:
            text = dataclasses.replace(self, multimodal_config={}, vision=None, audio=None).to_hf_config()
            del text["architectures"]
            if self.vision is not None and not self.is_hybrid:
                _write_vision_text(self, text, VISION_ARCHITECTURES[_architecture(self.multimodal_config)])
            if self.audio is not None:
                thinker = dict(self.multimodal_config["thinker_config"], text_config=text,
                               tie_word_embeddings=self.tie_word_embeddings)
                config = dict(self.multimodal_config, thinker_config=thinker)
                config["dtype" if "dtype" in config else "torch_dtype"] = _dtype_name(self.dtype)
                return dict(sorted(config.items()))
            config = dict(self.multimodal_config, text_config=text, tie_word_embeddings=self.tie_word_embeddings)
            config["dtype" if "dtype" in config else "torch_dtype"] = _dtype_name(self.dtype)
            return dict(sorted(config.items()))
        config: dict[str, Any] = dict(self.extra_config)
        config.update(
            architectures=[self.architecture],
            model_type=_ARCHITECTURE_TYPES[self.architecture],
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            hidden_act="silu",
            max_position_embeddings=self.max_position_embeddings,
            rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta,
            rope_scaling=_rope_scaling_json(self.rope_scaling),
            tie_word_embeddings=self.tie_word_embeddings,
            attention_bias=self.attention_bias,
            use_sliding_window=False,
            sliding_window=None,
            torch_dtype=_dtype_name(self.dtype),
        )
        if self.is_moe:
            config.update(
                num_experts=self.num_experts,
                num_experts_per_tok=self.num_experts_per_tok,
                moe_intermediate_size=self.moe_intermediate_size,
                norm_topk_prob=self.norm_topk_prob,
                decoder_sparse_step=self.decoder_sparse_step,
                mlp_only_layers=list(self.mlp_only_layers),
                router_aux_loss_coef=self.router_aux_loss_coef,
            )
        if self.is_hybrid:
            _write_hybrid(self, config)
        return dict(sorted(config.items()))


def _read_hybrid(args: ModelArgs, architecture: str, config: dict[str, Any]) -> None:
    """The hybrid models' keys, with transformers' defaults for those config.json leaves out."""
    def get(key: str) -> Any:
        return config.get(key, _HYBRID_DEFAULTS.get(key))

    args.hf_architecture = architecture
    layers = args.num_hidden_layers
    layer_types = config.get("layer_types")
    if layer_types is None:
        interval = get("full_attention_interval")
        layer_types = [FULL_ATTENTION if (i + 1) % interval == 0 else LINEAR_ATTENTION for i in range(layers)]
    if len(layer_types) != layers or set(layer_types) - {FULL_ATTENTION, LINEAR_ATTENTION}:
        raise ValueError(
            f"layer_types must name {layers} layers, each {FULL_ATTENTION!r} or {LINEAR_ATTENTION!r}; got {layer_types}"
        )
    args.layer_types = list(layer_types)
    rope_parameters = dict(config.get("rope_parameters") or {})
    args.partial_rotary_factor = float(rope_parameters.get("partial_rotary_factor", get("partial_rotary_factor")))
    known = {"rope_type", "type", "rope_theta", "partial_rotary_factor", "factor", "original_max_position_embeddings",
             "attention_factor", "beta_fast", "beta_slow", "truncate"}
    args.rope_extra = {key: value for key, value in rope_parameters.items() if key not in known}
    for key in ("linear_conv_kernel_dim", "linear_key_head_dim", "linear_value_head_dim", "linear_num_key_heads",
                "linear_num_value_heads"):
        setattr(args, key, get(key))
    if args.linear_num_value_heads % args.linear_num_key_heads:
        raise ValueError(
            f"linear_num_value_heads ({args.linear_num_value_heads}) is not a multiple of "
            f"linear_num_key_heads ({args.linear_num_key_heads})"
        )
    if architecture == QWEN3_5_ARCHITECTURE:
        return
    args.num_experts = config["num_experts"]
    args.num_experts_per_tok = config["num_experts_per_tok"]
    args.moe_intermediate_size = config["moe_intermediate_size"]
    args.shared_expert_intermediate_size = config["shared_expert_intermediate_size"]
    args.router_aux_loss_coef = config.get("router_aux_loss_coef", 0.001)
    # Qwen3.5-MoE always renormalises the top-k weights and has every layer sparse.
    args.norm_topk_prob = config.get("norm_topk_prob", True) if architecture == NEXT_ARCHITECTURE else True
    if architecture == NEXT_ARCHITECTURE:
        args.decoder_sparse_step = config.get("decoder_sparse_step", 1)
        args.mlp_only_layers = list(config.get("mlp_only_layers") or [])


def _write_vision_text(args: ModelArgs, text: dict[str, Any], model_type: str) -> None:
    """A Qwen3-VL text_config: its model_type, and rope_parameters with mrope_section (released spelling too)."""
    text["model_type"] = model_type
    rope = {"rope_type": "default", **args.rope_extra}
    text["rope_scaling"] = rope
    text["rope_parameters"] = {**rope, "rope_theta": args.rope_theta}
    if args.is_moe and args.audio is None:
        for key in ("norm_topk_prob", "use_sliding_window", "sliding_window"):  # not Qwen3VLMoeTextConfig's keys
            text.pop(key, None)
    elif args.audio is not None:
        text.pop("use_sliding_window", None)  # not a Qwen3OmniMoeTextConfig key


def _write_hybrid(args: ModelArgs, config: dict[str, Any]) -> None:
    """The hybrid keys, in the spelling of the released configs (rope_theta and partial_rotary_factor at the top)."""
    config.update(
        layer_types=list(args.layer_types),
        partial_rotary_factor=args.partial_rotary_factor,
        linear_conv_kernel_dim=args.linear_conv_kernel_dim,
        linear_key_head_dim=args.linear_key_head_dim,
        linear_value_head_dim=args.linear_value_head_dim,
        linear_num_key_heads=args.linear_num_key_heads,
        linear_num_value_heads=args.linear_num_value_heads,
    )
    if args.rope_extra:
        rope = {"rope_type": "default", "rope_theta": args.rope_theta, **(_rope_scaling_json(args.rope_scaling) or {})}
        config["rope_parameters"] = {**rope, "partial_rotary_factor": args.partial_rotary_factor, **args.rope_extra}
    # A Qwen3-Next config without these would get transformers' defaults (512 experts) even when dense.
    if args.is_moe or args.architecture == NEXT_ARCHITECTURE:
        config.update(
            num_experts=args.num_experts,
            num_experts_per_tok=args.num_experts_per_tok,
            moe_intermediate_size=args.moe_intermediate_size,
            shared_expert_intermediate_size=args.shared_expert_intermediate_size,
            norm_topk_prob=args.norm_topk_prob,
            decoder_sparse_step=args.decoder_sparse_step,
            mlp_only_layers=list(args.mlp_only_layers),
            router_aux_loss_coef=args.router_aux_loss_coef,
        )
    for key in ("use_sliding_window", "sliding_window"):  # Qwen3 keys the hybrid configs do not have
        config.pop(key, None)
    if args.architecture == QWEN3_5_MOE_ARCHITECTURE:
        # Keys transformers' Qwen3_5MoeTextConfig does not have (their values are implied).
        for key in ("intermediate_size", "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers"):
            config.pop(key, None)
    elif args.architecture == QWEN3_5_ARCHITECTURE:
        config.pop("mlp_only_layers", None)


def _architecture(config: dict[str, Any]) -> str:
    architectures = config.get("architectures") or []
    if not architectures and config.get("model_type") in _MODEL_TYPES:
        architectures = [_MODEL_TYPES[config["model_type"]]]
    if len(architectures) != 1 or architectures[0] not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"unsupported architecture {architectures or config.get('model_type')!r}; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return architectures[0]


def _rope(config: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    """rope_theta and the scaling, from rope_parameters (transformers 5) or rope_theta + rope_scaling."""
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    theta = params.pop("rope_theta", config.get("rope_theta", 10000.0))
    # Older configs say "type" where newer ones say "rope_type".
    rope_type = params.pop("rope_type", params.pop("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"unsupported rope type {rope_type!r}; supported: {', '.join(ROPE_TYPES)}")
    if rope_type == "default":
        return theta, None
    if "factor" not in params:
        raise ValueError(f"rope type {rope_type!r} needs a 'factor'")
    scaling = RopeScaling(rope_type=rope_type, factor=float(params["factor"]))
    if rope_type == "yarn":
        scaling.original_max_position_embeddings = params.get(
            "original_max_position_embeddings", config["max_position_embeddings"]
        )
        scaling.attention_factor = params.get("attention_factor")
        scaling.beta_fast = params.get("beta_fast")
        scaling.beta_slow = params.get("beta_slow")
        scaling.truncate = params.get("truncate", True)
        if params.get("mscale") or params.get("mscale_all_dim"):
            raise ValueError("yarn with mscale / mscale_all_dim (DeepSeek style) is not supported for Qwen3")
    return theta, scaling


def _rope_scaling_json(scaling: RopeScaling | None) -> dict[str, Any] | None:
    if scaling is None:
        return None
    out: dict[str, Any] = {"rope_type": scaling.rope_type, "factor": scaling.factor}
    if scaling.rope_type == "yarn":
        out["original_max_position_embeddings"] = scaling.original_max_position_embeddings
        for name in ("attention_factor", "beta_fast", "beta_slow"):
            if getattr(scaling, name) is not None:
                out[name] = getattr(scaling, name)
        if not scaling.truncate:
            out["truncate"] = False
    return out


def _dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, value in DTYPES.items() if value == dtype)
