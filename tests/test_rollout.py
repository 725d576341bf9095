"""Generation against transformers' generate and against full forwards of the same tokens, in fp32."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_checkpoints import VOCAB, build_hf_model, save_hf_model

from gspo_engine import generate, load_pretrained, replay_experts
from gspo_engine import rollout
from gspo_engine.rollout import sample_next

TOL = 1e-5
PROMPT_LENGTHS = [5, 9, 2, 7, 4]
MAX_NEW = 12
MODELS = {
    "dense_gqa": dict(moe=False),
    # One kv head for four query heads: the widest GQA fold; two MoE layers.
    "moe_one_kv_head": dict(moe=True, norm_topk_prob=True, num_key_value_heads=1, num_hidden_layers=2),
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tensors here are tiny: a second intra-op thread only adds waiting, a lot of it on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=list(MODELS))
def pair(request, tmp_path_factory):
    hf = build_hf_model(**MODELS[request.param])
    return hf, load_pretrained(save_hf_model(hf, tmp_path_factory.mktemp(request.param)))


def make_prompts(lengths=PROMPT_LENGTHS, seed: int = 3) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=generator).tolist() for n in lengths]


def cut_after_eos(tokens: list[int], eos: list[int]) -> list[int]:
    for index, token in enumerate(tokens):
        if token in eos:
            return tokens[: index + 1]
    return tokens


def transformers_greedy(hf, prompts: list[list[int]], max_new_tokens: int, eos: list[int]) -> list[list[int]]:
    width = max(len(p) for p in prompts)
    input_ids = torch.zeros(len(prompts), width, dtype=torch.long)
    attention_mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.tensor(prompt)
        attention_mask[row, width - len(prompt) :] = 1
    out = hf.generate(
        input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens, do_sample=False,
        eos_token_id=eos or None, pad_token_id=0,
    )
    return [cut_after_eos(row, eos) for row in out[:, width:].tolist()]


def an_early_eos(completions: list[list[int]], skip_rows: tuple[int, ...] = ()) -> int:
    """A token that ends some row between its 3rd and 7th token and never appears in another row."""
    for row, tokens in enumerate(completions):
        if row in skip_rows:
            continue
        for index in range(2, 7):
            token = tokens[index]
            others = [t for other, c in enumerate(completions) if other != row for t in c]
            if token not in tokens[:index] and token not in others:
                return token
    raise AssertionError(f"no token ends a row early in {completions}")


def full_forward_logits(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """[len(completion), V]: the logits each completion token was drawn from, by one forward without cache."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(ids)[0]
    return logits[len(prompt) - 1 : len(prompt) + len(completion) - 1]


@pytest.fixture(scope="module")
def greedy(pair):
    """The greedy run without eos, and a token that ends one of its rows early."""
    out = generate(pair[1], make_prompts(), max_new_tokens=MAX_NEW, temperature=0)
    return out, an_early_eos(out.tokens)


@pytest.fixture(scope="module")
def sampled(pair):
    return generate(pair[1], make_prompts(), max_new_tokens=MAX_NEW, temperature=0.7, seed=0)


def assert_logps_match_a_full_forward(model, prompts, out, temperature: float) -> None:
    for prompt, tokens, logps in zip(prompts, out.tokens, out.logps):
        assert logps.dtype == torch.float32 and logps.device.type == "cpu" and logps.shape == (len(tokens),)
        logits = full_forward_logits(model, prompt, tokens)
        expected = F.log_softmax(logits / temperature, dim=-1).gather(-1, torch.tensor(tokens)[:, None])
        torch.testing.assert_close(logps, expected.squeeze(-1), rtol=0, atol=TOL)


def test_greedy_matches_transformers(pair, greedy):
    hf, model = pair
    out, _ = greedy
    prompts = make_prompts()
    assert out.tokens == transformers_greedy(hf, prompts, MAX_NEW, [])
    assert all(len(tokens) == MAX_NEW for tokens in out.tokens)
    assert out.finished == [False] * len(prompts)
    # Greedy log-probs are the model's own, at temperature 1.
    assert_logps_match_a_full_forward(model, prompts, out, temperature=1.0)


def test_greedy_stops_at_eos_like_transformers(pair, greedy):
    hf, model = pair
    free_run, eos = greedy
    prompts = make_prompts()
    out = generate(model, prompts, max_new_tokens=MAX_NEW, temperature=0, eos_token_id=eos)
    assert out.tokens == transformers_greedy(hf, prompts, MAX_NEW, [eos])
    assert True in out.finished and False in out.finished
    for tokens, finished in zip(out.tokens, out.finished):
        assert finished == (tokens[-1] == eos)
        assert finished or len(tokens) == MAX_NEW
    assert min(len(tokens) for tokens in out.tokens) <= 7

    # A list of eos ids: a second one that ends another row, and one that is never produced.
    first_row = next(row for row, tokens in enumerate(free_run.tokens) if eos in tokens)
    second = an_early_eos(free_run.tokens, skip_rows=(first_row,))
    never_produced = min(set(range(VOCAB)) - {t for tokens in free_run.tokens for t in tokens})
    eos_ids = [never_produced, eos, second]
    as_list = generate(model, prompts, max_new_tokens=MAX_NEW, temperature=0, eos_token_id=eos_ids)
    assert as_list.tokens == transformers_greedy(hf, prompts, MAX_NEW, eos_ids)
    assert sum(as_list.finished) == sum(out.finished) + 1


def test_looking_for_finished_rows_every_few_steps_changes_nothing(pair, greedy, monkeypatch):
    # The GPU cadence: rows past their eos keep drawing tokens until the next look drops them.
    _, model = pair
    _, eos = greedy
    prompts = make_prompts()
    every_step = generate(model, prompts, max_new_tokens=MAX_NEW, temperature=0, eos_token_id=eos)
    monkeypatch.setattr(rollout, "finished_check_steps", lambda device: 3)
    every_third = generate(model, prompts, max_new_tokens=MAX_NEW, temperature=0, eos_token_id=eos)
    assert every_third.tokens == every_step.tokens
    assert every_third.finished == every_step.finished
    for a, b in zip(every_third.logps, every_step.logps):
        torch.testing.assert_close(a, b, rtol=0, atol=TOL)


def test_prefill_in_row_chunks_changes_nothing(pair, greedy, monkeypatch):
    _, model = pair
    prompts = make_prompts()
    whole = generate(model, prompts, max_new_tokens=MAX_NEW, temperature=0, return_routing=True)
    # Two rows of the 9 padded columns per prefill forward: chunks of 2, 2 and 1 rows.
    monkeypatch.setattr(rollout, "PREFILL_TOKENS", 2 * max(PROMPT_LENGTHS))
    chunked = generate(model, prompts, max_new_tokens=MAX_NEW, temperature=0, return_routing=True)
    assert chunked.tokens == whole.tokens == greedy[0].tokens
    for a, b in zip(chunked.logps, whole.logps):
        torch.testing.assert_close(a, b, rtol=0, atol=TOL)
    if whole.routing is not None:
        for a, b in zip(chunked.routing, whole.routing):
            assert torch.equal(a, b)


def test_sampled_logps_match_a_full_forward(pair, sampled):
    assert_logps_match_a_full_forward(pair[1], make_prompts(), sampled, temperature=0.7)


def test_top_k_draws_within_the_top_k_and_renormalises(pair):
    _, model = pair
    prompts = make_prompts()
    top_k, temperature = 3, 1.5
    out = generate(model, prompts, max_new_tokens=MAX_NEW, temperature=temperature, top_k=top_k, seed=1)
    for prompt, tokens, logps in zip(prompts, out.tokens, out.logps):
        values, indices = (full_forward_logits(model, prompt, tokens) / temperature).topk(top_k, dim=-1)
        slot = (indices == torch.tensor(tokens)[:, None]).float().argmax(dim=-1)
        assert (indices == torch.tensor(tokens)[:, None]).any(dim=-1).all()
        expected = values.log_softmax(dim=-1).gather(-1, slot[:, None]).squeeze(-1)
        torch.testing.assert_close(logps, expected, rtol=0, atol=TOL)


def test_top_p_draws_within_the_nucleus_and_renormalises(pair):
    _, model = pair
    prompts = make_prompts()
    top_p = 0.6
    out = generate(model, prompts, max_new_tokens=MAX_NEW, top_p=top_p, seed=2)
    for prompt, tokens, logps in zip(prompts, out.tokens, out.logps):
        probs = full_forward_logits(model, prompt, tokens).softmax(dim=-1)
        for position, token in enumerate(tokens):
            sorted_probs = probs[position].sort(descending=True).values
            nucleus_size = int((sorted_probs.cumsum(0) - sorted_probs < top_p).sum())
            nucleus = sorted_probs[:nucleus_size]
            assert probs[position, token] >= nucleus[-1]
            expected = (probs[position, token] / nucleus.sum()).log()
            assert abs(logps[position] - expected) < TOL


def test_seeded_sampling_is_reproducible_and_differs_across_seeds(pair, sampled):
    _, model = pair
    prompts = make_prompts()
    again = generate(model, prompts, max_new_tokens=MAX_NEW, temperature=0.7, seed=0)
    other = generate(model, prompts, max_new_tokens=MAX_NEW, temperature=0.7, seed=1)
    assert again.tokens == sampled.tokens
    for a, b in zip(again.logps, sampled.logps):
        assert torch.equal(a, b)
    assert other.tokens != sampled.tokens


def test_one_new_token_is_the_prefill_alone(pair, greedy):
    _, model = pair
    out = generate(model, make_prompts(), max_new_tokens=1, temperature=0)
    assert out.tokens == [tokens[:1] for tokens in greedy[0].tokens]
    assert out.decode_tokens == 0


def test_timing_counts_prompt_and_completion_tokens(sampled):
    assert sampled.prefill_tokens == sum(PROMPT_LENGTHS)
    assert sampled.decode_tokens == sum(len(tokens) for tokens in sampled.tokens) - len(PROMPT_LENGTHS)
    assert sampled.prefill_s > 0 and sampled.decode_s > 0
    assert sampled.prefill_tokens_per_s > 0 and sampled.decode_tokens_per_s > 0


def test_routing_matches_a_full_forward_and_replays(pair, greedy):
    _, model = pair
    prompts = make_prompts()
    _, eos = greedy
    out = generate(model, prompts, max_new_tokens=MAX_NEW, temperature=0, eos_token_id=eos, return_routing=True)
    if not model.args.moe_layers:
        assert out.routing is None
        return
    num_moe_layers, k = len(model.args.moe_layers), model.args.num_experts_per_tok
    sequences = [prompt + tokens for prompt, tokens in zip(prompts, out.tokens)]
    for sequence, experts in zip(sequences, out.routing):
        # The model was fed every token but the last one.
        assert experts.shape == (len(sequence) - 1, num_moe_layers, k)
        with torch.no_grad():
            routing = [r.expert_indices for r in model.forward_hidden(torch.tensor([sequence[:-1]])).routing]
        expected = torch.stack(routing, dim=1)
        assert torch.equal(experts.long().sort(dim=-1).values, expected.sort(dim=-1).values)

    # As the trainer batches them: right-padded, the routing replayed gives the free run's output.
    length = max(len(s) for s in sequences) - 1
    input_ids = torch.zeros(len(sequences), length, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        input_ids[row, : len(sequence) - 1] = torch.tensor(sequence[:-1])
    forced = replay_experts(out.routing, length)
    assert [f.shape for f in forced] == [(len(sequences), length, k)] * num_moe_layers
    with torch.no_grad():
        free = model.forward_hidden(input_ids).hidden_states
        replayed = model.forward_hidden(input_ids, forced_experts=forced).hidden_states
    for row, sequence in enumerate(sequences):
        real = len(sequence) - 1
        torch.testing.assert_close(replayed[row, :real], free[row, :real], rtol=0, atol=1e-6)


def test_sampled_frequencies_follow_the_filtered_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]]).expand(40000, -1)
    generator = torch.Generator().manual_seed(0)
    tokens, logps = sample_next(logits, 0.8, top_k=4, top_p=0.9, generator=generator)
    scaled = logits[0, :4] / 0.8
    probs = scaled.softmax(-1)
    keep = (probs.cumsum(0) - probs) < 0.9
    expected = torch.zeros(5)
    expected[:4] = torch.where(keep, probs, 0) / probs[keep].sum()
    frequencies = torch.bincount(tokens, minlength=5) / tokens.numel()
    assert (frequencies - expected).abs().max() < 0.01
    torch.testing.assert_close(logps, expected[tokens].log())


@pytest.mark.parametrize(
    "prompts, options, message",
    [
        ([], dict(max_new_tokens=4), "at least one prompt"),
        ([[1, 2], []], dict(max_new_tokens=4), "prompt 1 is empty"),
        ([[1, VOCAB]], dict(max_new_tokens=4), "outside the vocabulary"),
        ([[1, 2]], dict(max_new_tokens=0), "max_new_tokens"),
        ([[1, 2]], dict(max_new_tokens=4, temperature=-1.0), "temperature"),
        ([[1, 2]], dict(max_new_tokens=4, top_p=0.0), "top_p"),
        ([[1, 2]], dict(max_new_tokens=4, top_k=-1), "top_k"),
    ],
)
def test_bad_arguments_are_refused(pair, prompts, options, message):
    with pytest.raises(ValueError, match=message):
        generate(pair[1], prompts, **options)


def test_bfloat16_model_generates(pair, tmp_path):
    hf, _ = pair
    model = load_pretrained(save_hf_model(hf, tmp_path / "hf"), dtype=torch.bfloat16)
    out = generate(model, make_prompts(), max_new_tokens=MAX_NEW, temperature=0.7, top_k=20, seed=0)
    assert all(len(tokens) == MAX_NEW for tokens in out.tokens)
    for logps in out.logps:
        assert logps.dtype == torch.float32 and torch.isfinite(logps).all() and (logps <= 0).all()


def test_generates_under_autocast(pair):
    _, model = pair
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = generate(model, make_prompts(), max_new_tokens=MAX_NEW, temperature=0.7, seed=0)
    assert all(len(tokens) == MAX_NEW for tokens in out.tokens)
    for logps in out.logps:
        assert logps.dtype == torch.float32 and torch.isfinite(logps).all() and (logps <= 0).all()


def test_keyed_draws_follow_the_filtered_distribution():
    from gspo_engine.rollout import mix32, row_keys

    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]]).expand(40000, -1)
    keys = mix32(row_keys(7, list(range(40000))) ^ 3)
    tokens, logps = sample_next(logits, 0.8, top_k=0, top_p=0.9, generator=None, keys=keys)
    probs = (logits[0] / 0.8).softmax(-1)
    keep = (probs.cumsum(0) - probs) < 0.9
    expected = torch.where(keep, probs, 0) / probs[keep].sum()
    frequencies = torch.bincount(tokens, minlength=5) / tokens.numel()
    assert (frequencies - expected).abs().max() < 0.01
    torch.testing.assert_close(logps, expected[tokens].log())


def test_keyed_uniforms_are_uniform_and_distinct_per_row_and_column():
    from gspo_engine.rollout import keyed_uniform, row_keys

    uniform = keyed_uniform(row_keys(0, list(range(64))), 4096)
    assert 0 < uniform.min() and uniform.max() < 1
    assert abs(uniform.mean().item() - 0.5) < 0.002 and abs(uniform.var().item() - 1 / 12) < 0.001
    # Neighbouring rows and columns are uncorrelated.
    assert abs(torch.corrcoef(uniform[:2])[0, 1].item()) < 0.05
    assert abs(torch.corrcoef(uniform[:, :2].T)[0, 1].item()) < 0.3
    assert not torch.equal(keyed_uniform(row_keys(1, [0]), 16), keyed_uniform(row_keys(0, [0]), 16))


def test_rows_with_sample_ids_draw_the_same_tokens_in_any_batch(pair):
    _, model = pair
    prompts = make_prompts()
    ids = [100 + 7 * row for row in range(len(prompts))]
    whole = generate(model, prompts, max_new_tokens=MAX_NEW, temperature=1.0, seed=5, sample_ids=ids)
    # Split in two batches in another order, as two data-parallel ranks would hold them.
    odd = list(range(1, len(prompts), 2))[::-1]
    even = list(range(0, len(prompts), 2))
    for part in (odd, even):
        out = generate(model, [prompts[r] for r in part], max_new_tokens=MAX_NEW, temperature=1.0, seed=5,
                       sample_ids=[ids[r] for r in part])
        for index, row in enumerate(part):
            assert out.tokens[index] == whole.tokens[row]
            torch.testing.assert_close(out.logps[index], whole.logps[row], rtol=1e-4, atol=1e-5)
    other = generate(model, prompts, max_new_tokens=MAX_NEW, temperature=1.0, seed=6, sample_ids=ids)
    assert other.tokens != whole.tokens
    with pytest.raises(ValueError, match="distinct ids"):
        generate(model, prompts, max_new_tokens=MAX_NEW, seed=5, sample_ids=[0] * len(prompts))
    with pytest.raises(ValueError, match="needs a seed"):
        generate(model, prompts, max_new_tokens=MAX_NEW, sample_ids=ids)


def test_the_kv_cache_is_freed_as_soon_as_generation_returns(pair):
    """No reference cycle: the cache goes with its last reference, without waiting for the garbage collector."""
    import gc
    import weakref

    from gspo_engine.model.kv_cache import KVCache

    _, model = pair
    gc.disable()
    try:
        cache = KVCache.allocate(model.args, 2, 8, torch.float32, torch.device("cpu"))
        keys = weakref.ref(cache.keys[0])
        del cache
        assert keys() is None
        allocated = []
        original = KVCache.allocate.__func__

        def tracked(cls, *args, **kwargs):
            made = original(cls, *args, **kwargs)
            allocated.append(weakref.ref(made.keys[0]))
            return made

        KVCache.allocate = classmethod(tracked)
        try:
            generate(model, make_prompts(), max_new_tokens=MAX_NEW, temperature=0.7, seed=0)
        finally:
            KVCache.allocate = classmethod(original)
        assert allocated and all(ref() is None for ref in allocated)
    finally:
        gc.enable()
