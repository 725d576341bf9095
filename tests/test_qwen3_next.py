"""Qwen3-Next and Qwen3.5 text models against transformers' own classes (the parity oracle)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from gspo_engine.hf_checkpoint import CheckpointError, hf_pieces, load_pretrained, save_pretrained
from gspo_engine.model import ModelArgs, PackedSequences, Qwen3NextModel
from tiny_hybrid_checkpoints import (
    MTP_TENSORS,
    MULTIMODAL,
    VARIANTS,
    VOCAB,
    build_hybrid_model,
    mtp_tensors,
    padded_batch,
    save_hybrid_checkpoint,
)

LOGIT_TOLERANCE = 2e-4


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """variant -> (transformers model, folder); Qwen3-Next as released: full_attention_interval, shards, mtp.*"""
    out = {}
    for seed, variant in enumerate(VARIANTS):
        model = build_hybrid_model(variant, seed=seed)
        folder = tmp_path_factory.mktemp(variant)
        released_like = variant == "next"
        save_hybrid_checkpoint(
            model, folder, shards=released_like or variant == "qwen3.5-moe", mtp=released_like,
            interval_only=released_like,
        )
        out[variant] = (model, folder)
    return out


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("padding", [None, "left", "right"])
def test_logits_match_transformers(checkpoints, variant, padding):
    hf_model, folder = checkpoints[variant]
    model = load_pretrained(folder, dtype=torch.float32)
    assert isinstance(model, Qwen3NextModel)
    input_ids, attention_mask, position_ids = padded_batch(side=padding or "left")
    if padding is None:
        attention_mask, position_ids = None, None
    with torch.no_grad():
        expected = hf_model(input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
        logits = model(input_ids, attention_mask, position_ids)
    real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    assert expected.abs().max() > 1.0  # weights large enough for a wrong one to show
    torch.testing.assert_close(logits[real], expected[real], rtol=0, atol=LOGIT_TOLERANCE)
    if padding is not None:
        # Padding reaches neither the convolution nor the recurrent state: each row as if alone.
        for row in range(input_ids.shape[0]):
            tokens = input_ids[row][real[row]][None]
            with torch.no_grad():
                alone = model(tokens)
            torch.testing.assert_close(logits[row][real[row]], alone[0], rtol=0, atol=LOGIT_TOLERANCE)


@pytest.mark.parametrize("variant", ["next", "next-layer-types", "qwen3.5", "qwen3.5-moe"])
def test_gradients_match_transformers(variant, tmp_path):
    # Four layers and weights of std 0.1: at 0.15 and eight layers the fp32 gradients of transformers
    # and of this model both move by up to 1e-3 from an fp64 computation, too far for the check to mean much.
    hf_model = build_hybrid_model(variant, seed=2, num_hidden_layers=4, initializer_range=0.1)
    model = load_pretrained(save_hybrid_checkpoint(hf_model, tmp_path), dtype=torch.float32)
    input_ids, attention_mask, position_ids = padded_batch(seed=3)
    weights = torch.randn(*input_ids.shape, VOCAB, generator=torch.Generator().manual_seed(4))
    weights = weights * attention_mask[..., None]

    hf_model.zero_grad()
    (hf_model(input_ids, attention_mask=attention_mask, position_ids=position_ids).logits * weights).sum().backward()
    (model(input_ids, attention_mask, position_ids) * weights).sum().backward()
    hf_grads = {name: p.grad for name, p in hf_model.named_parameters()}
    checked = 0
    for name, param in model.named_parameters():
        hf_key = hf_pieces(name, param, model.args, grouped_experts=True)[0].hf_key
        expected = hf_grads[hf_key]
        assert param.grad is not None, name
        error = (param.grad - expected).norm() / expected.norm().clamp(min=1e-12)
        assert error < 1e-4, f"{name}: relative gradient error {error:.2e}"
        checked += 1
    assert checked == len(hf_grads)


def test_packed_sequences_each_start_from_zero_states(checkpoints):
    _, folder = checkpoints["next"]
    # In fp64, where the only differences left are the packed path's own.
    model = load_pretrained(folder, dtype=torch.float32).double()
    generator = torch.Generator().manual_seed(5)
    lengths = [9, 1, 14, 5]
    sequences = [torch.randint(0, VOCAB, (1, n), generator=generator) for n in lengths]
    packed = PackedSequences.from_lengths(lengths)
    weights = torch.randn(1, sum(lengths), VOCAB, generator=generator, dtype=torch.float64)
    logits = model(torch.cat(sequences, dim=1), packed=packed)
    (logits * weights).sum().backward()
    packed_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    start = 0
    for tokens, n in zip(sequences, lengths):
        alone = model(tokens)
        torch.testing.assert_close(logits[:, start : start + n], alone, rtol=0, atol=1e-10)
        (alone * weights[:, start : start + n]).sum().backward()
        start += n
    for name, param in model.named_parameters():
        torch.testing.assert_close(packed_grads[name], param.grad, rtol=1e-9, atol=1e-10, msg=name)


def test_saved_checkpoint_loads_in_transformers_and_keeps_mtp(checkpoints, tmp_path):
    hf_model, folder = checkpoints["next"]
    model = load_pretrained(folder, dtype=torch.float32)
    assert model.args.carried_keys == sorted(MTP_TENSORS)
    save_pretrained(model, tmp_path / "saved", max_shard_bytes=30_000)
    saved = tmp_path / "saved"
    config = json.loads((saved / "config.json").read_text())
    assert config["architectures"] == ["Qwen3NextForCausalLM"] and config["model_type"] == "qwen3_next"
    assert config["layer_types"] == hf_model.config.layer_types
    for key, tensor in mtp_tensors(folder).items():
        assert torch.equal(mtp_tensors(saved)[key], tensor), key
    reloaded = AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32).eval()
    expected_weights = hf_model.state_dict()
    for key, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, expected_weights[key]), key
    input_ids, attention_mask, position_ids = padded_batch(seed=6)
    with torch.no_grad():
        expected = hf_model(input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
        got = reloaded(input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
        ours = model(input_ids, attention_mask, position_ids)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    real = attention_mask.bool()
    torch.testing.assert_close(ours[real], got[real], rtol=0, atol=LOGIT_TOLERANCE)
    # And back into ours: the same model, the mtp tensors still carried.
    again = load_pretrained(saved, dtype=torch.float32)
    assert again.args.carried_keys == sorted(MTP_TENSORS)
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("variant", ["qwen3.5", "qwen3.5-moe", "next-layer-types"])
def test_saved_config_reads_back_the_same_model(checkpoints, variant, tmp_path):
    hf_model, folder = checkpoints[variant]
    model = load_pretrained(folder, dtype=torch.float32)
    save_pretrained(model, tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(reloaded) is type(hf_model)
    for key in ("layer_types", "linear_num_value_heads", "tie_word_embeddings"):
        assert getattr(reloaded.config, key) == getattr(hf_model.config, key), key
    expected_weights = hf_model.state_dict()
    for key, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, expected_weights[key]), key


def test_layer_layout_from_full_attention_interval():
    config = json.loads(json.dumps(build_hybrid_model("next").config.to_dict()))
    del config["layer_types"]
    config["full_attention_interval"] = 3
    args = ModelArgs.from_hf_config(config)
    assert args.linear_attention_layers == [0, 1, 3, 4, 6, 7]
    assert args.rotary_dim == 2  # head_dim 8 * the default partial_rotary_factor 0.25


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c.update(layer_types=["full_attention"] * 3), "layer_types must name 8 layers"),
        (lambda c: c.update(layer_types=["sliding_attention"] * 8), "layer_types must name"),
        (lambda c: c.pop("shared_expert_intermediate_size"), "shared_expert_intermediate_size"),
        (lambda c: c.update(linear_num_value_heads=3), "linear_num_value_heads"),
    ],
)
def test_bad_configs_name_the_key(change, message):
    config = json.loads(json.dumps(build_hybrid_model("next").config.to_dict()))
    change(config)
    with pytest.raises(ValueError, match=message):
        ModelArgs.from_hf_config(config)


def test_unknown_tensors_are_still_refused(checkpoints, tmp_path):
    hf_model, _ = checkpoints["qwen3.5"]
    save_hybrid_checkpoint(hf_model, tmp_path)
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / "model.safetensors")
    tensors["model.layers.0.linear_attn.extra.weight"] = torch.zeros(2)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="unexpected tensor model.layers.0.linear_attn.extra.weight"):
        load_pretrained(tmp_path)


def test_loading_onto_cuda_without_fla_core_names_the_extra(checkpoints):
    import importlib.util

    from gspo_engine.model.fla_backend import MissingFlashLinearAttention

    if importlib.util.find_spec("fla") is not None:
        pytest.skip("fla-core is installed here")
    with pytest.raises(MissingFlashLinearAttention, match=r"pip install 'gspo-engine\[next\]'"):
        load_pretrained(checkpoints["qwen3.5"][1], device="cuda")


@pytest.mark.parametrize("variant", list(MULTIMODAL))
def test_released_image_text_qwen3_5_trains_its_language_model_and_keeps_the_rest(variant, tmp_path):
    """Qwen3.5 as released: text_config, tensors under model.language_model., its vision tower in the model."""
    hf_model = build_hybrid_model(variant, seed=5)
    folder = save_hybrid_checkpoint(hf_model, tmp_path / "source", mtp=True)
    model = load_pretrained(folder, dtype=torch.float32)
    assert model.args.architecture in ("Qwen3_5ForCausalLM", "Qwen3_5MoeForCausalLM")
    assert model.args.vision is not None  # the tower is part of the model (model/qwen3_vl_hybrid.py)
    assert not any(key.startswith("model.visual.") for key in model.args.carried_keys)
    input_ids, attention_mask, position_ids = padded_batch(seed=9)
    real = attention_mask.bool()
    with torch.no_grad():
        expected = hf_model(input_ids=input_ids, attention_mask=attention_mask).logits
        logits = model(input_ids, attention_mask, position_ids)
    assert expected.abs().max() > 1.0
    torch.testing.assert_close(logits[real], expected[real], rtol=0, atol=LOGIT_TOLERANCE)

    save_pretrained(model, tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert config["architectures"] == [type(hf_model).__name__] and "vision_config" in config
    reloaded = type(hf_model).from_pretrained(tmp_path / "saved", dtype=torch.float32)
    expected_weights = hf_model.state_dict()
    for key, tensor in reloaded.state_dict().items():  # the vision tower's too
        assert torch.equal(tensor, expected_weights[key]), key
    for key, tensor in mtp_tensors(folder).items():
        assert torch.equal(mtp_tensors(tmp_path / "saved")[key], tensor), key
