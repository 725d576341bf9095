"""Released Qwen3-family models: their Hub names, the shapes of those the planner knows, and the closest
released models to names that were never released.

The Hub answers an unreleased name with "not found"; the messages that say so name real models from this
table instead. The planner (`gspo-engine plan`, `train --dry-run`) reads the shapes here to plan a released
model before anything is downloaded. A leaf module: it imports nothing of the package.
"""

from __future__ import annotations

import difflib

QWEN_ORG = "Qwen"

# Models of the Qwen3 family on the Hub under Qwen/ (without their -Base, -FP8 and quantised variants).
RELEASED_QWEN3: tuple[str, ...] = (
    "Qwen3-0.6B", "Qwen3-1.7B", "Qwen3-4B", "Qwen3-8B", "Qwen3-14B", "Qwen3-32B",
    "Qwen3-30B-A3B", "Qwen3-235B-A22B",
    "Qwen3-4B-Instruct-2507", "Qwen3-4B-Thinking-2507",
    "Qwen3-30B-A3B-Instruct-2507", "Qwen3-30B-A3B-Thinking-2507",
    "Qwen3-235B-A22B-Instruct-2507", "Qwen3-235B-A22B-Thinking-2507",
    "Qwen3-Coder-30B-A3B-Instruct", "Qwen3-Coder-480B-A35B-Instruct",
    "Qwen3-Omni-30B-A3B-Instruct", "Qwen3-Omni-30B-A3B-Thinking", "Qwen3-Omni-30B-A3B-Captioner",
    "Qwen3-Next-80B-A3B-Instruct", "Qwen3-Next-80B-A3B-Thinking",
    "Qwen3-VL-4B-Instruct", "Qwen3-VL-8B-Instruct", "Qwen3-VL-30B-A3B-Instruct", "Qwen3-VL-235B-A22B-Instruct",
)

# Names people write that were never released, with the released models closest in family and size.
NOT_RELEASED: dict[str, tuple[str, ...]] = {
    "Qwen3-7B": ("Qwen3-8B", "Qwen3-4B"),
    "Qwen3-4B-Instruct": ("Qwen3-4B-Instruct-2507", "Qwen3-4B"),
    "Qwen3-72B-MoE": ("Qwen3-30B-A3B", "Qwen3-235B-A22B"),
    "Qwen3-Coder-7B-Instruct": ("Qwen3-Coder-30B-A3B-Instruct",),
    "Qwen3-Omni-7B": ("Qwen3-Omni-30B-A3B-Instruct",),
    "Qwen3-Next-7B": ("Qwen3-Next-80B-A3B-Instruct",),
}

_QWEN3_VOCAB = 151936
_DENSE_4B = dict(
    architectures=["Qwen3ForCausalLM"], vocab_size=_QWEN3_VOCAB, hidden_size=2560, intermediate_size=9728,
    num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
    max_position_embeddings=40960, tie_word_embeddings=True, torch_dtype="bfloat16",
)
_DENSE_8B = _DENSE_4B | dict(hidden_size=4096, intermediate_size=12288, tie_word_embeddings=False)
_MOE_30B = dict(
    architectures=["Qwen3MoeForCausalLM"], vocab_size=_QWEN3_VOCAB, hidden_size=2048, intermediate_size=6144,
    num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
    max_position_embeddings=40960, num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
    norm_topk_prob=True, torch_dtype="bfloat16",
)
# Hybrid: 48 layers, every 4th gated full attention, the others Gated DeltaNet; 512 experts, top-10, a shared expert.
_NEXT_80B = dict(
    architectures=["Qwen3NextForCausalLM"], vocab_size=_QWEN3_VOCAB, hidden_size=2048, intermediate_size=5120,
    num_hidden_layers=48, num_attention_heads=16, num_key_value_heads=2, head_dim=256,
    max_position_embeddings=262144, rope_theta=10000000, partial_rotary_factor=0.25, full_attention_interval=4,
    linear_conv_kernel_dim=4, linear_key_head_dim=128, linear_value_head_dim=128, linear_num_key_heads=16,
    linear_num_value_heads=32, num_experts=512, num_experts_per_tok=10, moe_intermediate_size=512,
    shared_expert_intermediate_size=512, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
    tie_word_embeddings=False, torch_dtype="bfloat16",
)
# Qwen3-VL-8B-Instruct: Qwen3-8B's text layers (with interleaved multimodal RoPE) and the 27-block vision tower.
_VL_8B = dict(
    architectures=["Qwen3VLForConditionalGeneration"], model_type="qwen3_vl", image_token_id=151655,
    video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653, tie_word_embeddings=False,
    text_config=dict(
        vocab_size=_QWEN3_VOCAB, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=262144,
        rope_theta=5000000, rope_scaling={"rope_type": "default", "mrope_section": [24, 20, 20], "mrope_interleaved": True},
        dtype="bfloat16", model_type="qwen3_vl_text",
    ),
    vision_config=dict(
        depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, hidden_act="gelu_pytorch_tanh",
        in_channels=3, patch_size=16, temporal_patch_size=2, spatial_merge_size=2, out_hidden_size=4096,
        num_position_embeddings=2304, deepstack_visual_indexes=[8, 16, 24],
    ),
)
# Qwen3-Omni-30B-A3B-Instruct's thinker (the model trained; the talker and code2wav are only carried through
# saves): Qwen3-30B-A3B-like text layers, the 27-block vision tower and the 32-layer audio encoder.
_OMNI_30B = dict(
    architectures=["Qwen3OmniMoeForConditionalGeneration"], model_type="qwen3_omni_moe", enable_audio_output=True,
    thinker_config=dict(
        model_type="qwen3_omni_moe_thinker", audio_token_id=151675, audio_start_token_id=151669,
        audio_end_token_id=151670, image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
        vision_end_token_id=151653, position_id_per_seconds=13, tie_word_embeddings=False,
        text_config=dict(
            vocab_size=152064, hidden_size=2048, intermediate_size=768, num_hidden_layers=48, num_attention_heads=32,
            num_key_value_heads=4, head_dim=128, max_position_embeddings=65536, rope_theta=1000000,
            rope_scaling={"rope_type": "default", "mrope_section": [24, 20, 20], "interleaved": True,
                          "mrope_interleaved": True},
            num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768, norm_topk_prob=True,
            decoder_sparse_step=1, mlp_only_layers=[], model_type="qwen3_omni_moe_text",
        ),
        vision_config=dict(
            depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, hidden_act="gelu_pytorch_tanh",
            in_channels=3, patch_size=16, temporal_patch_size=2, spatial_merge_size=2, out_hidden_size=2048,
            num_position_embeddings=2304, deepstack_visual_indexes=[8, 16, 24],
        ),
        audio_config=dict(
            num_mel_bins=128, encoder_layers=32, encoder_attention_heads=20, encoder_ffn_dim=5120, d_model=1280,
            output_dim=2048, max_source_positions=1500, n_window=50, n_window_infer=800, conv_chunksize=500,
            downsample_hidden_size=480, activation_function="gelu",
        ),
    ),
    dtype="bfloat16",
)
# Shapes of released checkpoints, as their config.json files publish them.
RELEASED_SHAPES: dict[str, dict] = {
    "Qwen3-4B": _DENSE_4B,
    "Qwen3-4B-Instruct-2507": _DENSE_4B | {"max_position_embeddings": 262144},
    "Qwen3-8B": _DENSE_8B,
    "Qwen3-30B-A3B": _MOE_30B,
    "Qwen3-30B-A3B-Instruct-2507": _MOE_30B | {"max_position_embeddings": 262144},
    "Qwen3-Coder-30B-A3B-Instruct": _MOE_30B | {"max_position_embeddings": 262144},
    "Qwen3-235B-A22B": _MOE_30B | dict(
        hidden_size=4096, intermediate_size=12288, num_hidden_layers=94, num_attention_heads=64,
        moe_intermediate_size=1536,
    ),
    "Qwen3-Next-80B-A3B-Instruct": _NEXT_80B,
    "Qwen3-Next-80B-A3B-Thinking": _NEXT_80B,
    "Qwen3-VL-8B-Instruct": _VL_8B,
    "Qwen3-Omni-30B-A3B-Instruct": _OMNI_30B,
    "Qwen3-Omni-30B-A3B-Thinking": _OMNI_30B,
}


def is_released(name: str) -> bool:
    """Whether `name` (without its Qwen/ prefix) is in the table of released models, in any letter case."""
    return name.lower() in {released.lower() for released in RELEASED_QWEN3}


def closest_released(name: str, count: int = 3) -> list[str]:
    """Released models closest to `name` (without its Qwen/ prefix): the table's choice for a name people
    write that was never released, else the nearest spellings; empty when nothing is close."""
    for unreleased, suggestions in NOT_RELEASED.items():
        if unreleased.lower() == name.lower():
            return list(suggestions)
    by_lower = {released.lower(): released for released in RELEASED_QWEN3}
    matches = difflib.get_close_matches(name.lower(), list(by_lower), n=count, cutoff=0.6)
    return [by_lower[match] for match in matches]


def released_hint(repo_id: str) -> str:
    """For a Qwen/ id that is not a released model: a sentence naming the closest released ones (else "")."""
    org, _, name = repo_id.partition("/")
    if org.lower() != QWEN_ORG.lower() or is_released(name):
        return ""
    suggestions = closest_released(name)
    listed = ", ".join(f"{QWEN_ORG}/{suggestion}" for suggestion in suggestions) if suggestions else (
        ", ".join(f"{QWEN_ORG}/{released}" for released in RELEASED_QWEN3[:8]) + ", ..."
    )
    closest = "the closest released models" if suggestions else "released Qwen3 models"
    return f"{name} is not a released Qwen3 model; {closest}: {listed}"
