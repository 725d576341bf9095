"""Generation with Qwen3-Next / Qwen3.5: conv and recurrent states beside the KV cache, against transformers."""

from __future__ import annotations

import pytest
import torch

from gspo_engine.hf_checkpoint import load_pretrained
from gspo_engine.model.hybrid_cache import HybridCache
from gspo_engine.model.kv_cache import KVCache, slot_bytes
from gspo_engine.rollout import generate
from tiny_hybrid_checkpoints import VOCAB, build_hybrid_model, save_hybrid_checkpoint

PROMPT_LENGTHS = [5, 1, 12, 8, 70]  # 70: more than one 64-token chunk of the delta rule


@pytest.fixture(scope="module", params=["next", "qwen3.5-moe"])
def pair(request, tmp_path_factory):
    hf_model = build_hybrid_model(request.param, seed=11)
    folder = save_hybrid_checkpoint(hf_model, tmp_path_factory.mktemp(request.param))
    return hf_model, load_pretrained(folder, dtype=torch.float32)


def prompts(seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=generator).tolist() for n in PROMPT_LENGTHS]


def transformers_greedy(hf_model, prompt: list[int], new_tokens: int) -> list[int]:
    input_ids = torch.tensor([prompt])
    out = hf_model.generate(
        input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens, do_sample=False,
        eos_token_id=None, pad_token_id=VOCAB,  # a pad id no token has, so nothing is taken for padding
    )
    return out[0, len(prompt):].tolist()


def test_greedy_generation_equals_transformers(pair):
    hf_model, model = pair
    batch = prompts()
    generation = generate(model, batch, max_new_tokens=16, temperature=0)
    assert isinstance(generation.slots, int) and generation.slots == len(batch)
    for prompt, tokens in zip(batch, generation.tokens):
        assert tokens == transformers_greedy(hf_model, prompt, 16)


def test_two_slots_refilled_give_the_same_tokens(pair):
    """Prompts wait for a free slot and running sequences move between slots: their states move with them."""
    _, model = pair
    batch = prompts(seed=1)
    everything = generate(model, batch, max_new_tokens=12, temperature=0)
    per_slot = everything.kv_cache_bytes / everything.slots
    budget = generate(model, batch, max_new_tokens=12, temperature=0, kv_cache_gb=2.5 * per_slot / 1e9)
    assert budget.slots == 2
    assert budget.tokens == everything.tokens


def test_a_decode_step_equals_the_full_forward(pair):
    _, model = pair
    generator = torch.Generator().manual_seed(2)
    lengths = torch.tensor([9, 3])
    tokens = torch.randint(0, VOCAB, (2, 10), generator=generator)
    cache = KVCache.allocate(model.args, 2, 12, torch.float32, torch.device("cpu"))
    assert isinstance(cache, HybridCache)
    mask = (torch.arange(9)[None] < lengths[:, None]).long()
    with torch.no_grad():
        model.forward_hidden(tokens[:, :9] * mask, mask, torch.arange(9)[None].expand(2, -1),
                             cache=cache.prefill(torch.tensor([0, 1]), lengths))
        fed = torch.stack([tokens[0, 9], tokens[1, 3]])
        view = cache.decode(2, 10)
        step = model.forward_hidden(fed[:, None], position_ids=view.column_index[:, None], cache=view).hidden_states
        for row, length in enumerate(lengths.tolist()):
            whole = torch.cat((tokens[row, :length], fed[row : row + 1]))[None]
            expected = model.forward_hidden(whole).hidden_states[0, -1]
            torch.testing.assert_close(step[row, 0], expected, rtol=0, atol=2e-5)


def test_slot_bytes_count_states_and_attention_layers_only(pair):
    _, model = pair
    cache = KVCache.allocate(model.args, 3, 40, torch.bfloat16, torch.device("cpu"))
    assert cache.nbytes == 3 * slot_bytes(model.args, 40, torch.bfloat16)
    assert len(cache.keys) == model.args.num_hidden_layers - len(model.args.linear_attention_layers)
    assert all(state.dtype == torch.float32 for state in cache.recurrent.values())
