"""The model against transformers' Qwen3 / Qwen3-MoE in fp32, and its own features (replay, aux loss, checkpointing)."""

from __future__ import annotations

import pytest
import torch
from tiny_checkpoints import VOCAB, build_hf_model, left_padded_batch, save_hf_model
from transformers import AutoModelForCausalLM
from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

from gspo_engine import load_pretrained
from gspo_engine.model import ModelOutput, Qwen3Model

TOL = 1e-4

CONFIGS = {
    "dense_gqa_untied": dict(moe=False),
    "dense_mha_tied_bias": dict(moe=False, num_key_value_heads=4, tie_word_embeddings=True, attention_bias=True),
    "moe_norm_topk": dict(moe=True, norm_topk_prob=True),
    "moe_no_norm_sparse_step_2": dict(moe=True, norm_topk_prob=False, decoder_sparse_step=2, num_hidden_layers=4),
    "moe_mlp_only_tied": dict(moe=True, norm_topk_prob=True, mlp_only_layers=[0, 2], tie_word_embeddings=True),
    "moe_one_kv_head": dict(moe=True, num_key_value_heads=1, num_experts_per_tok=3),
    "moe_sparse_step_and_mlp_only": dict(moe=True, decoder_sparse_step=2, mlp_only_layers=[1], num_hidden_layers=4),
    "dense_eps_theta": dict(moe=False, rms_norm_eps=1e-3, rope_parameters={"rope_theta": 1e6}),
}


def load_pair(tmp_path, moe: bool, **overrides) -> tuple[torch.nn.Module, Qwen3Model]:
    hf = build_hf_model(moe=moe, **overrides)
    return hf, load_pretrained(save_hf_model(hf, tmp_path / "hf"))


@pytest.fixture(scope="module")
def moe_pair(tmp_path_factory):
    return load_pair(tmp_path_factory.mktemp("moe"), moe=True, norm_topk_prob=True)


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_transformers(tmp_path, name):
    hf, model = load_pair(tmp_path, **CONFIGS[name])
    input_ids, attention_mask, position_ids = left_padded_batch()
    with torch.no_grad():
        expected = hf(input_ids).logits
        assert (model(input_ids) - expected).abs().max() < TOL

        expected = hf(input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
        got = model(input_ids, attention_mask, position_ids)
    tokens = attention_mask.bool()
    assert torch.isfinite(got).all(), "padding positions must not produce NaN"
    assert (got[tokens] - expected[tokens]).abs().max() < TOL


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "linear", "factor": 2.0},
        {"rope_type": "dynamic", "factor": 3.0},
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2},
        {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 4, "beta_fast": 16, "beta_slow": 2},
    ],
    ids=["linear", "dynamic", "yarn", "yarn_betas"],
)
def test_rope_scaling_matches_transformers(tmp_path, rope):
    # max_position_embeddings below the sequence length, so that dynamic NTK actually rescales.
    hf, model = load_pair(
        tmp_path, moe=False, max_position_embeddings=8, rope_parameters={"rope_theta": 500.0} | rope
    )
    input_ids = torch.randint(0, VOCAB, (2, 14), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(input_ids) - hf(input_ids).logits).abs().max() < TOL


def test_hidden_states_and_lm_head_weight_give_the_logits(moe_pair):
    _, model = moe_pair
    input_ids, attention_mask, position_ids = left_padded_batch()
    with torch.no_grad():
        hidden = model.forward_hidden(input_ids, attention_mask, position_ids).hidden_states
        logits = model(input_ids, attention_mask, position_ids)
    assert hidden.shape == (*input_ids.shape, model.args.hidden_size)
    assert model.lm_head_weight.shape == (VOCAB, model.args.hidden_size)
    torch.testing.assert_close(hidden @ model.lm_head_weight.t(), logits)


def test_tied_lm_head_is_the_embedding(tmp_path):
    _, model = load_pair(tmp_path, moe=False, tie_word_embeddings=True)
    assert model.lm_head is None
    assert model.lm_head_weight is model.embed_tokens.weight


def test_which_layers_are_sparse_follows_transformers(tmp_path):
    hf, model = load_pair(tmp_path, moe=True, decoder_sparse_step=2, mlp_only_layers=[1], num_hidden_layers=6)
    expected = [i for i, layer in enumerate(hf.model.layers) if hasattr(layer.mlp, "experts")]
    assert model.args.moe_layers == expected == [3, 5]


def test_run_reports_routing_per_moe_layer(tmp_path):
    _, model = load_pair(tmp_path, moe=True, decoder_sparse_step=2, num_hidden_layers=4)
    input_ids, _, _ = left_padded_batch()
    with torch.no_grad():
        output = model.forward_hidden(input_ids)
    assert isinstance(output, ModelOutput)
    assert model.args.moe_layers == [1, 3]
    assert len(output.routing) == 2
    tokens = input_ids.numel()
    for routing in output.routing:
        assert routing.router_logits.shape == (tokens, model.args.num_experts)
        assert routing.expert_indices.shape == (tokens, model.args.num_experts_per_tok)
        assert routing.expert_indices.dtype == torch.int64
    assert output.aux_loss is None


def test_router_logits_match_transformers(moe_pair):
    hf, model = moe_pair
    input_ids, _, _ = left_padded_batch()
    with torch.no_grad():
        expected = hf(input_ids, output_router_logits=True).router_logits
        got = model.forward_hidden(input_ids).routing
    assert len(got) == len(expected)
    for ours, theirs in zip(got, expected):
        assert (ours.router_logits - theirs).abs().max() < TOL


def test_replaying_the_recorded_routing_reproduces_the_logits(moe_pair):
    _, model = moe_pair
    input_ids, attention_mask, position_ids = left_padded_batch()
    with torch.no_grad():
        recorded = model.forward_hidden(input_ids, attention_mask, position_ids)
        replayed = model.forward_hidden(input_ids, attention_mask, position_ids, forced_experts=[r.expert_indices for r in recorded.routing])
    torch.testing.assert_close(replayed.hidden_states, recorded.hidden_states, rtol=0, atol=0)


def test_forced_experts_are_used_and_the_router_keeps_its_gradient(moe_pair):
    _, model = moe_pair
    input_ids, _, _ = left_padded_batch()
    with torch.no_grad():
        free = model.forward_hidden(input_ids)
    # Replay the experts each token ranked lowest: a routing the router would never choose itself.
    forced = [r.router_logits.topk(model.args.num_experts_per_tok, largest=False).indices for r in free.routing]
    forced_batched = [f.view(*input_ids.shape, -1) for f in forced]  # [B, T, k] is accepted too
    output = model.forward_hidden(input_ids, forced_experts=forced_batched)
    for routing, expected in zip(output.routing, forced):
        assert torch.equal(routing.expert_indices, expected)
    assert not torch.allclose(output.hidden_states, free.hidden_states)
    output.hidden_states.pow(2).sum().backward()
    for block in model.layers:
        if block.is_moe:
            assert block.mlp.router.weight.grad is not None
            assert block.mlp.router.weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)


def test_forced_experts_needs_one_entry_per_moe_layer(moe_pair):
    _, model = moe_pair
    input_ids, _, _ = left_padded_batch()
    with pytest.raises(ValueError, match="forced_experts has 1 entries for 3 MoE layers"):
        model.forward_hidden(input_ids, forced_experts=[None])


@pytest.mark.parametrize("padded", [False, True], ids=["no_mask", "left_padded"])
def test_aux_loss_matches_transformers_on_one_moe_layer(tmp_path, padded):
    hf, model = load_pair(tmp_path, moe=True, num_hidden_layers=2, decoder_sparse_step=2, router_aux_loss_coef=0.01)
    input_ids, attention_mask, position_ids = left_padded_batch()
    if not padded:
        attention_mask, position_ids = None, None
    model.args.router_aux_loss = True
    with torch.no_grad():
        out = hf(input_ids, attention_mask=attention_mask, position_ids=position_ids, output_router_logits=True)
        expected = load_balancing_loss_func(out.router_logits, 6, 2, attention_mask)
        got = model.forward_hidden(input_ids, attention_mask, position_ids).aux_loss
    torch.testing.assert_close(got, 0.01 * expected)


def test_aux_loss_is_the_mean_over_moe_layers(moe_pair):
    _, model = moe_pair
    input_ids, _, _ = left_padded_batch()
    model.args.router_aux_loss = True
    try:
        output = model.forward_hidden(input_ids)
    finally:
        model.args.router_aux_loss = False
    per_layer = [
        load_balancing_loss_func((r.router_logits,), model.args.num_experts, model.args.num_experts_per_tok)
        for r in output.routing
    ]
    torch.testing.assert_close(output.aux_loss, model.args.router_aux_loss_coef * torch.stack(per_layer).mean())
    output.aux_loss.backward()
    assert all(b.mlp.router.weight.grad is not None for b in model.layers if b.is_moe)
    model.zero_grad(set_to_none=True)


def test_activation_checkpointing_gives_the_same_loss_and_gradients(moe_pair):
    _, model = moe_pair
    input_ids, attention_mask, position_ids = left_padded_batch()

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss = model(input_ids, attention_mask, position_ids).logsumexp(-1).mean()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    plain_loss, plain_grads = loss_and_grads()
    model.args.activation_checkpointing = True
    try:
        ckpt_loss, ckpt_grads = loss_and_grads()
    finally:
        model.args.activation_checkpointing = False
        model.zero_grad(set_to_none=True)
    torch.testing.assert_close(ckpt_loss, plain_loss)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(ckpt_grads[name], grad, msg=name)


def test_bfloat16_matches_transformers(tmp_path):
    path = save_hf_model(build_hf_model(moe=True, norm_topk_prob=True), tmp_path / "hf")
    model = load_pretrained(path, dtype=torch.bfloat16)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    input_ids, attention_mask, position_ids = left_padded_batch()
    with torch.no_grad():
        got = model(input_ids, attention_mask, position_ids)
        expected = hf(input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    assert got.dtype == torch.bfloat16
    tokens = attention_mask.bool()
    torch.testing.assert_close(got[tokens], expected[tokens])


def test_moe_experts_compute_in_the_autocast_dtype(moe_pair, monkeypatch):
    import gspo_kernels

    _, model = moe_pair
    input_ids, attention_mask, position_ids = left_padded_batch()
    real = attention_mask.bool()
    seen = []

    def recording(x, *args):
        seen.append((x.dtype, args[2].dtype))
        return real_experts(x, *args)

    # SparseMoE runs its own router's experts through routed_experts (moe_experts without the host read).
    real_experts = gspo_kernels.routed_experts
    with torch.no_grad():
        full = model.forward_hidden(input_ids, attention_mask, position_ids).hidden_states
        monkeypatch.setattr(gspo_kernels, "routed_experts", recording)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = model.forward_hidden(input_ids, attention_mask, position_ids).hidden_states
    assert seen and all(dtypes == (torch.bfloat16, torch.bfloat16) for dtypes in seen)
    error = (mixed.float() - full)[real].norm() / full[real].norm()
    assert error < 3e-2
