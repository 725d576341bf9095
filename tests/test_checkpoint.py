"""load_pretrained / save_pretrained against checkpoints written by transformers, and their errors."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tiny_checkpoints import build_hf_model, left_padded_batch, save_hf_model, write_released_config
from transformers import AutoModelForCausalLM

from gspo_engine import load_pretrained, save_pretrained
from gspo_engine.hf_checkpoint import CheckpointError

TOL = 1e-4
REPO = Path(__file__).resolve().parents[1]


def max_logit_error(model, hf, padded: bool = True) -> float:
    input_ids, attention_mask, position_ids = left_padded_batch()
    if not padded:
        attention_mask = torch.ones_like(input_ids)
        position_ids = None
    with torch.no_grad():
        got = model(input_ids, attention_mask, position_ids)
        expected = hf(input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    tokens = attention_mask.bool()
    return (got[tokens] - expected[tokens]).abs().max().item()


def rewrite_file(path: Path, change) -> None:
    """Apply change(dict of tensors) to a single-file safetensors checkpoint."""
    with safe_open(path, framework="pt") as f:
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.fixture(scope="module")
def moe_checkpoint(tmp_path_factory):
    """A tiny MoE checkpoint saved by transformers 5 (num_local_experts, rope_parameters, dtype)."""
    hf = build_hf_model(moe=True, norm_topk_prob=True, decoder_sparse_step=2, num_hidden_layers=4)
    return hf, save_hf_model(hf, tmp_path_factory.mktemp("moe") / "hf")


def test_transformers_5_config_loads(moe_checkpoint):
    hf, path = moe_checkpoint
    config = json.loads((path / "config.json").read_text())
    assert {"num_local_experts", "rope_parameters", "dtype"} <= set(config)
    assert not {"num_experts", "rope_theta", "torch_dtype"} & set(config)
    model = load_pretrained(path)
    assert model.args.num_experts == 6 and model.args.decoder_sparse_step == 2
    assert max_logit_error(model, hf) < TOL


@pytest.mark.parametrize(
    "moe, overrides",
    [
        (True, dict(norm_topk_prob=True, mlp_only_layers=[1])),
        (False, dict(tie_word_embeddings=True, rope_parameters={"rope_theta": 1e6})),
        (True, dict(norm_topk_prob=False, max_position_embeddings=8,
                    rope_parameters={"rope_theta": 1e6, "rope_type": "yarn", "factor": 4.0,
                                     "original_max_position_embeddings": 2})),
    ],
    ids=["moe", "dense_tied", "moe_yarn"],
)
def test_released_style_config_loads(tmp_path, moe, overrides):
    hf = build_hf_model(moe=moe, **overrides)
    path = save_hf_model(hf, tmp_path / "released")
    write_released_config(path, json.loads((path / "config.json").read_text()))
    config = json.loads((path / "config.json").read_text())
    assert "rope_parameters" not in config and "dtype" not in config and "rope_theta" in config
    assert ("num_experts" in config) == moe and "num_local_experts" not in config
    model = load_pretrained(path)
    # The weights were written in fp32: a config saying bfloat16 would have them rounded.
    assert model.embed_tokens.weight.dtype == torch.float32
    assert max_logit_error(model, hf) < TOL
    assert max_logit_error(model, AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)) < TOL


def test_handwritten_released_config(tmp_path):
    """A config.json as Qwen/Qwen3-30B-A3B ships it, scaled down, with "type" for the rope scaling kind."""
    hf = build_hf_model(moe=True, norm_topk_prob=True, num_hidden_layers=2)
    path = save_hf_model(hf, tmp_path / "qwen3-moe")
    released = {
        "architectures": ["Qwen3MoeForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "decoder_sparse_step": 1,
        "eos_token_id": 2,
        "head_dim": 16,
        "hidden_act": "silu",
        "hidden_size": 32,
        "initializer_range": 0.02,
        "intermediate_size": 48,
        "max_position_embeddings": 64,
        "max_window_layers": 2,
        "mlp_only_layers": [],
        "model_type": "qwen3_moe",
        "moe_intermediate_size": 24,
        "norm_topk_prob": True,
        "num_attention_heads": 4,
        "num_experts": 6,
        "num_experts_per_tok": 2,
        "num_hidden_layers": 2,
        "num_key_value_heads": 2,
        "output_router_logits": False,
        "rms_norm_eps": 1e-06,
        "rope_scaling": {"type": "linear", "factor": 2.0},
        "rope_theta": 1000000.0,
        "router_aux_loss_coef": 0.001,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.51.0",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": 96,
    }
    (path / "config.json").write_text(json.dumps(released, indent=2))
    model = load_pretrained(path, dtype=torch.float32)
    assert model.args.rope_theta == 1e6 and model.args.rope_scaling.rope_type == "linear"
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert max_logit_error(model, reference) < TOL
    assert load_pretrained(path).embed_tokens.weight.dtype == torch.bfloat16  # torch_dtype is the default


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_sharded_checkpoint_loads(tmp_path, moe):
    hf = build_hf_model(moe=moe)
    path = save_hf_model(hf, tmp_path / "sharded", max_shard_size="40KB")
    shards = sorted(p.name for p in path.glob("*.safetensors"))
    assert len(shards) > 2 and (path / "model.safetensors.index.json").is_file()
    assert max_logit_error(load_pretrained(path), hf) < TOL


def test_grouped_expert_layout_loads(tmp_path):
    hf = build_hf_model(moe=True)
    path = save_hf_model(hf, tmp_path / "grouped", save_original_format=False)
    with safe_open(path / "model.safetensors", framework="pt") as f:
        assert "model.layers.0.mlp.experts.gate_up_proj" in f.keys()
    assert max_logit_error(load_pretrained(path), hf) < TOL


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_save_then_transformers_loads_the_same_model(tmp_path, tied):
    hf = build_hf_model(moe=True, norm_topk_prob=True, mlp_only_layers=[0], tie_word_embeddings=tied)
    source = save_hf_model(hf, tmp_path / "source")
    (source / "tokenizer_config.json").write_text('{"chat_template": "{{ messages }}"}')
    (source / "generation_config.json").write_text('{"eos_token_id": 2}')
    model = load_pretrained(source)

    saved = tmp_path / "saved"
    save_pretrained(model, saved, max_shard_bytes=20_000)
    config = json.loads((saved / "config.json").read_text())
    assert config["num_experts"] == 6 and "rope_theta" in config and config["torch_dtype"] == "float32"
    assert "num_local_experts" not in config and "rope_parameters" not in config
    index = json.loads((saved / "model.safetensors.index.json").read_text())
    assert "model.layers.1.mlp.experts.5.up_proj.weight" in index["weight_map"]
    assert ("lm_head.weight" in index["weight_map"]) != tied
    for name in ("tokenizer_config.json", "generation_config.json"):
        assert (saved / name).read_text() == (source / name).read_text()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no staging folder left behind"

    reloaded_hf = AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32)
    assert max_logit_error(model, reloaded_hf) < TOL
    assert max_logit_error(model, reloaded_hf, padded=False) < TOL
    assert max_logit_error(load_pretrained(saved), hf) < TOL


def test_save_replaces_an_existing_folder_and_writes_the_current_dtype(tmp_path, moe_checkpoint):
    _, path = moe_checkpoint
    model = load_pretrained(path).to(torch.bfloat16)
    target = tmp_path / "out"
    target.mkdir()
    (target / "stale.safetensors").write_text("old")
    save_pretrained(model, target)
    assert not (target / "stale.safetensors").exists()
    assert json.loads((target / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert (target / "model.safetensors").is_file()
    reloaded = load_pretrained(target)
    for (name, ours), (_, theirs) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(ours, theirs), name


def test_load_to_dtype(moe_checkpoint):
    _, path = moe_checkpoint
    model = load_pretrained(path, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not any(p.is_meta for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())


# Errors --------------------------------------------------------------------------------------------------------


@pytest.fixture
def dense_checkpoint(tmp_path):
    return save_hf_model(build_hf_model(), tmp_path / "dense")


def test_missing_config(tmp_path):
    with pytest.raises(CheckpointError, match="config.json not found"):
        load_pretrained(tmp_path)


def test_no_weights(dense_checkpoint):
    (dense_checkpoint / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors or model.safetensors.index.json"):
        load_pretrained(dense_checkpoint)


def test_missing_shard_file(tmp_path):
    path = save_hf_model(build_hf_model(moe=True), tmp_path / "sharded", max_shard_size="40KB")
    second = sorted(path.glob("model-00002-of-*.safetensors"))[0]
    second.unlink()
    with pytest.raises(CheckpointError, match=f"missing shard file {second.name}"):
        load_pretrained(path)


def test_missing_tensor(dense_checkpoint):
    rewrite_file(dense_checkpoint / "model.safetensors", lambda t: t.pop("model.layers.1.self_attn.k_norm.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor model\.layers\.1\.self_attn\.k_norm\.weight"):
        load_pretrained(dense_checkpoint)


def test_missing_expert(tmp_path):
    path = save_hf_model(build_hf_model(moe=True), tmp_path / "moe")
    rewrite_file(path / "model.safetensors", lambda t: t.pop("model.layers.2.mlp.experts.4.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor model\.layers\.2\.mlp\.experts\.4\.up_proj\.weight"):
        load_pretrained(path)


def test_unexpected_tensor(dense_checkpoint):
    rewrite_file(dense_checkpoint / "model.safetensors", lambda t: t.update({"model.extra.weight": torch.ones(3)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor model\.extra\.weight"):
        load_pretrained(dense_checkpoint)


def test_shape_mismatch_is_refused_not_reinitialised(dense_checkpoint):
    config = json.loads((dense_checkpoint / "config.json").read_text())
    config["intermediate_size"] = 40
    (dense_checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        CheckpointError,
        match=r"shape mismatch for model\.layers\.0\.mlp\.gate_proj\.weight: expected \[40, 32\], found \[48, 32\]",
    ):
        load_pretrained(dense_checkpoint)


def test_expert_shape_mismatch(tmp_path):
    path = save_hf_model(build_hf_model(moe=True), tmp_path / "moe")
    config = json.loads((path / "config.json").read_text()) | {"moe_intermediate_size": 20}
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        CheckpointError,
        match=(
            r"shape mismatch for model\.layers\.0\.mlp\.experts\.0\.gate_proj\.weight: "
            r"expected \[20, 32\], found \[24, 32\]"
        ),
    ):
        load_pretrained(path)


def test_unsupported_tensor_dtype(dense_checkpoint):
    def to_fp8(tensors):
        tensors["model.norm.weight"] = tensors["model.norm.weight"].to(torch.float8_e4m3fn)

    rewrite_file(dense_checkpoint / "model.safetensors", to_fp8)
    with pytest.raises(CheckpointError, match=r"unsupported dtype F8_E4M3 for model\.norm\.weight"):
        load_pretrained(dense_checkpoint)


def test_unsupported_requested_dtype(dense_checkpoint):
    with pytest.raises(CheckpointError, match=r"unsupported dtype torch\.int8"):
        load_pretrained(dense_checkpoint, dtype=torch.int8)


def test_tensor_listed_in_index_but_absent_from_its_shard(tmp_path):
    path = save_hf_model(build_hf_model(), tmp_path / "sharded", max_shard_size="40KB")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.0.extra.weight"] = next(iter(index["weight_map"].values()))
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.extra\.weight is listed in .* but missing from"):
        load_pretrained(path)


def test_config_key_missing(dense_checkpoint):
    config = json.loads((dense_checkpoint / "config.json").read_text())
    del config["hidden_size"]
    (dense_checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="config.json lacks hidden_size"):
        load_pretrained(dense_checkpoint)


@pytest.mark.parametrize(
    "change, message",
    [
        (
            {"architectures": ["LlamaForCausalLM"]},
            "unsupported architecture.*LlamaForCausalLM.*supported: Qwen3ForCausalLM, Qwen3MoeForCausalLM",
        ),
        ({"rope_parameters": {"rope_type": "longrope", "factor": 2.0}}, "unsupported rope type 'longrope'"),
        ({"rope_parameters": {"rope_type": "linear"}}, "rope type 'linear' needs a 'factor'"),
        ({"use_sliding_window": True}, "use_sliding_window=true is not supported"),
        ({"hidden_act": "gelu"}, "unsupported hidden_act 'gelu'"),
        ({"dtype": "float64"}, "unsupported dtype 'float64' in config.json"),
    ],
    ids=["architecture", "rope_type", "rope_factor", "sliding_window", "activation", "config_dtype"],
)
def test_unsupported_config(dense_checkpoint, change, message):
    config = json.loads((dense_checkpoint / "config.json").read_text()) | change
    (dense_checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        load_pretrained(dense_checkpoint)


def test_tied_checkpoint_with_an_lm_head_copy_loads(tmp_path):
    hf = build_hf_model(tie_word_embeddings=True)
    path = save_hf_model(hf, tmp_path / "tied")
    rewrite_file(
        path / "model.safetensors",
        lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].clone()}),
    )
    assert max_logit_error(load_pretrained(path), hf) < TOL


# Memory --------------------------------------------------------------------------------------------------------

WRITE_BIG_CHECKPOINT = textwrap.dedent(
    """
    import json, sys
    import torch
    from safetensors.torch import save_file
    from gspo_engine.hf_checkpoint import hf_state_dict
    from gspo_engine.model import ModelArgs, Qwen3Model

    folder = sys.argv[1]
    with torch.device("meta"):
        model = Qwen3Model(ModelArgs.from_hf_config(json.load(open(folder + "/config.json"))))
    tensors = {key: torch.full(t.shape, 0.01) for key, t in hf_state_dict(model).items()}
    save_file(tensors, folder + "/model.safetensors")
    print(sum(t.numel() * t.element_size() for t in tensors.values()) / 2**20)
    """
)

PEAK_RSS_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys
    from gspo_engine import load_pretrained

    def peak_mib():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def current_mib():
        return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20

    # Warm up every code path (imports, the meta device) on a tiny checkpoint, so that what
    # grows below is the big load alone.
    load_pretrained(sys.argv[2])
    start = current_mib()
    model = load_pretrained(sys.argv[1])
    print(json.dumps({"start_mib": start, "peak_mib": peak_mib(), "end_mib": current_mib()}))
    """
)


@pytest.mark.slow
def test_loading_does_not_hold_two_copies_of_the_weights(tmp_path):
    tiny = save_hf_model(build_hf_model(moe=True), tmp_path / "tiny")
    big = tmp_path / "big"
    big.mkdir()
    config = {
        "architectures": ["Qwen3MoeForCausalLM"], "vocab_size": 16000, "hidden_size": 1024, "intermediate_size": 2048,
        "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 128,
        "max_position_embeddings": 128, "moe_intermediate_size": 512, "num_experts": 8, "num_experts_per_tok": 2,
        "mlp_only_layers": [0], "torch_dtype": "float32",
    }
    (big / "config.json").write_text(json.dumps(config))

    def run(script, *argv):
        result = subprocess.run(
            [sys.executable, "-c", script, *map(str, argv)], capture_output=True, text=True, cwd=REPO, timeout=300
        )
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout.strip().splitlines()[-1])

    weights_mib = run(WRITE_BIG_CHECKPOINT, big)
    figures = run(PEAK_RSS_SCRIPT, big, tiny) | {"weights_mib": weights_mib}
    print(figures)
    assert weights_mib > 300
    # One copy of the weights plus the memory-mapped window and the tensor in flight, never two copies.
    assert figures["peak_mib"] - figures["start_mib"] < 1.5 * weights_mib, figures
    assert figures["end_mib"] - figures["start_mib"] < 1.1 * weights_mib, figures
