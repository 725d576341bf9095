"""The embedded tiny models: small random Qwen3 / Qwen3-MoE / Qwen3-Next checkpoints with the digit-task tokenizer.

They are written as ordinary Hugging Face folders (config.json, model.safetensors, tokenizer
files) and then loaded like any released checkpoint, so the tiny default trains through exactly
the code a real model uses.

The tokenizer has one token per digit, one per built-in task, `=`, `<eos>` (which also pads) and
`<unk>`; it is saved as tokenizer.json + tokenizer_config.json so that it loads through
AutoTokenizer like a released model's.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

from gspo_engine.builtin_tasks import SEPARATOR
from gspo_engine.config import BUILTIN_TASKS
from gspo_engine.hf_checkpoint import save_pretrained
from gspo_engine.model import ModelArgs, Qwen3Model, build_model
from gspo_engine.model.args import FULL_ATTENTION, LINEAR_ATTENTION, NEXT_ARCHITECTURE
from gspo_engine.tiny_omni import TEXT as TINY_OMNI_TEXT, build_tiny_omni_checkpoint, tiny_omni_args
from gspo_engine.tiny_vl import TEXT as TINY_VL_TEXT, build_tiny_vl_checkpoint, tiny_vl_args

EOS, UNK = "<eos>", "<unk>"

_COMMON = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, max_position_embeddings=128, rope_theta=10000.0, dtype=torch.float32,
)
TINY_MODELS: dict[str, dict] = {
    "tiny-moe": dict(_COMMON, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True,
                     router_aux_loss_coef=0.001),
    "tiny-dense": dict(_COMMON, tie_word_embeddings=True),
    # Qwen3-Next's layers at tiny size: a Gated DeltaNet layer (two value heads per key head), then a
    # gated full-attention one with partial RoPE; MoE with a shared expert on both.
    "tiny-next": dict(
        _COMMON, hf_architecture=NEXT_ARCHITECTURE, layer_types=[LINEAR_ATTENTION, FULL_ATTENTION],
        partial_rotary_factor=0.25, linear_conv_kernel_dim=4, linear_key_head_dim=16, linear_value_head_dim=16,
        linear_num_key_heads=2, linear_num_value_heads=4, num_experts=8, num_experts_per_tok=2,
        moe_intermediate_size=32, shared_expert_intermediate_size=32, norm_topk_prob=True, router_aux_loss_coef=0.001,
    ),
    # A Qwen3-VL: tiny dense text layers and a tiny vision tower, with vision tokens (gspo_engine/tiny_vl.py).
    "tiny-vl": TINY_VL_TEXT,
    # A Qwen3-Omni thinker: tiny MoE text layers, a vision tower and an audio encoder (gspo_engine/tiny_omni.py).
    "tiny-omni": TINY_OMNI_TEXT,
}
INIT_STD = 0.02  # Qwen3's initializer_range


def tiny_vocabulary() -> list[str]:
    return [EOS, UNK, *"0123456789", SEPARATOR, *(f"<{task}>" for task in BUILTIN_TASKS)]


def save_tiny_tokenizer(folder: str | Path, model_max_length: int = 256) -> Path:
    """Write tokenizer.json and tokenizer_config.json of the task tokenizer into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocabulary = {token: index for index, token in enumerate(tiny_vocabulary())}
    tokenizer = Tokenizer(models.WordLevel(vocabulary, unk_token=UNK))
    # One piece per task tag, one per other character; Fuse joins them back without spaces.
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"<[a-z]+>|[\s\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    # Only <eos> is special, and it also pads (as in Qwen3's base models): a completion ends at its
    # first <eos>, so no token can vanish from the decoded text in the middle of one (with a separate
    # pad token, RL learns to shorten answers by emitting it). <unk> stays an ordinary token, not
    # named in the config where transformers would make it special, for the same reason.
    tokenizer.add_special_tokens([AddedToken(EOS, special=True, normalized=False)])
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": EOS,
        "pad_token": EOS,
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder


def tiny_model_args(name: str) -> ModelArgs:
    if name not in TINY_MODELS:
        raise ValueError(f"unknown tiny model {name!r}; choose one of {', '.join(TINY_MODELS)}")
    if name == "tiny-vl":
        return tiny_vl_args()
    if name == "tiny-omni":
        return tiny_omni_args()
    return ModelArgs(vocab_size=len(tiny_vocabulary()), **TINY_MODELS[name])


def init_weights(model: Qwen3Model, seed: int) -> None:
    """Every matrix N(0, INIT_STD), every norm weight 1, from one seeded generator (same seed, same model).

    In the hybrid models, as transformers initialises them: the zero-centred norms' weights 0 (a scale
    of 1), dt_bias 1 and A_log = log(U(0.01, 16)), so that each value head forgets at its own rate.
    """
    generator = torch.Generator().manual_seed(seed)
    hybrid = model.args.is_hybrid
    with torch.no_grad():
        for name, parameter in sorted(model.named_parameters()):
            if parameter.dim() >= 2:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * INIT_STD)
            elif hybrid and name.endswith("A_log"):
                parameter.copy_((torch.rand(parameter.shape, generator=generator) * 15.99 + 0.01).log())
            elif hybrid and name.endswith("norm.weight") and not name.endswith("linear_attn.norm.weight"):
                parameter.fill_(0.0)
            else:
                parameter.fill_(1.0)


def build_tiny_checkpoint(name: str, folder: str | Path, seed: int = 0) -> Path:
    """Write the random tiny model `name` (with its tokenizer) as a checkpoint folder."""
    if name == "tiny-vl":
        return build_tiny_vl_checkpoint(folder, seed)
    if name == "tiny-omni":
        return build_tiny_omni_checkpoint(folder, seed)
    args = tiny_model_args(name)
    model = build_model(args)
    init_weights(model, seed)
    with tempfile.TemporaryDirectory() as tokenizer_folder:
        save_tiny_tokenizer(tokenizer_folder, model_max_length=args.max_position_embeddings)
        model.args.source_path = tokenizer_folder  # save_pretrained copies the tokenizer files from here
        save_pretrained(model, folder)
    return Path(folder)
