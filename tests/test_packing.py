"""Packed micro-batches: the layout, attention kept inside each sequence, and an update equal to the padded one."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_checkpoints import VOCAB, build_hf_model, save_hf_model

from gspo_engine import load_pretrained
from gspo_engine.batching import Sample
from gspo_engine.config import GSPOConfig
from gspo_engine.distributed.runtime import Runtime
from gspo_engine.model import PackedSequences
from gspo_engine.model import packed as packed_module
from gspo_engine.model.packed import packed_attention
from gspo_engine.packing import pack, split_packed_micro_batches
from gspo_engine.scoring import score_samples
from gspo_engine.step_context import StepContext
from gspo_engine.update import PolicyUpdate


def test_pack_lays_out_tokens_and_completions():
    samples = [Sample([5, 6, 7], [8, 9]), Sample([5], [1, 2, 3, 4]), Sample([4, 4], [])]
    batch = pack(samples)
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 5, 1, 2, 3, 4]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2, 3, 0]]
    assert batch.packed.lengths == (4, 4, 1)
    assert batch.packed.cu_seqlens.tolist() == [0, 4, 8, 9]
    assert batch.targets[batch.mask].tolist() == [8, 9, 1, 2, 3, 4]
    assert batch.mask.sum(dim=1).tolist() == [2, 4, 0]
    # The packed column whose output predicts each completion token: the one holding the token before it.
    assert batch.completion_index[batch.mask].tolist() == [2, 3, 4, 5, 6, 7]
    values = batch.scatter([torch.tensor([0.5, 0.25]), torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([])])
    assert values[batch.mask].tolist() == [0.5, 0.25, 1.0, 2.0, 3.0, 4.0]
    scores = torch.arange(6.0)[None]
    assert [s.tolist() for s in batch.split_scores(scores)] == [[0.0, 1.0], [2.0, 3.0, 4.0, 5.0], []]


@pytest.mark.parametrize("budget", [1, 7, 16, 1000])
def test_packed_micro_batches_respect_the_token_budget(budget):
    samples = [Sample([1, 2], [3] * n) for n in (1, 5, 2, 9, 3, 3)]
    parts = split_packed_micro_batches(samples, budget)
    assert [s for p in parts for s in p] == samples
    for part in parts:
        assert len(part) == 1 or sum(s.num_positions for s in part) <= budget
    # Greedy: no micro-batch could have taken the next one's first sequence.
    for part, following in zip(parts, parts[1:]):
        assert sum(s.num_positions for s in part) + following[0].num_positions > budget


def test_packed_sequences_reject_bad_input():
    with pytest.raises(ValueError, match="at least one sequence"):
        PackedSequences.from_lengths([])
    with pytest.raises(ValueError, match="at least one token"):
        PackedSequences.from_lengths([3, 0])
    packed = PackedSequences.from_lengths([2, 3])
    with pytest.raises(ValueError, match=r"\[1, 5\]"):
        packed.check_row(torch.zeros(2, 5, dtype=torch.long))
    q = torch.zeros(1, 2, 5, 8)
    with pytest.raises(ValueError, match="backend must be one of"):
        packed_attention(q, q, q, packed, 1, backend="dense")


def reference_attention(q, k, v, lengths) -> torch.Tensor:
    """float64, the whole row at once under a block-diagonal causal mask."""
    q, k, v = (t.double() for t in (q, k, v))
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    documents = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    positions = torch.arange(documents.numel())
    allowed = (documents[:, None] == documents[None, :]) & (positions[:, None] >= positions[None, :])
    scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    return scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1) @ v


@pytest.mark.parametrize("lengths", [[1, 7, 13, 2], [9], [1, 1, 1]])
def test_packed_attention_matches_a_float64_reference(lengths):
    torch.manual_seed(len(lengths))
    total, heads, kv_heads, dim = sum(lengths), 4, 2, 16
    q = torch.randn(1, heads, total, dim, requires_grad=True)
    k = torch.randn(1, kv_heads, total, dim, requires_grad=True)
    v = torch.randn(1, kv_heads, total, dim, requires_grad=True)
    packed = PackedSequences.from_lengths(lengths)
    leaves64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    expected = reference_attention(*leaves64, lengths)
    got = packed_attention(q, k, v, packed, heads // kv_heads, backend="segments")
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)
    weights = torch.randn_like(expected)
    expected_grads = torch.autograd.grad((expected * weights).sum(), leaves64)
    got_grads = torch.autograd.grad((got.double() * weights).sum(), (q, k, v))
    for g, e in zip(got_grads, expected_grads):
        torch.testing.assert_close(g.double(), e, atol=1e-5, rtol=1e-5)
    # FlexAttention's document mask (CUDA's default without flash-attn) on the same row; forward only on CPU.
    flex = packed_attention(q.detach(), k.detach(), v.detach(), packed, heads // kv_heads, backend="flex")
    torch.testing.assert_close(flex.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module", params=[False, True], ids=["dense", "moe"])
def model(request, tmp_path_factory):
    hf = build_hf_model(moe=request.param, norm_topk_prob=True) if request.param else build_hf_model(moe=False)
    return load_pretrained(save_hf_model(hf, tmp_path_factory.mktemp("hf") / "model"))


@pytest.mark.parametrize("checkpointing", [False, True], ids=["stored", "recomputed"])
def test_packed_forward_equals_each_sequence_on_its_own(model, checkpointing, monkeypatch):
    torch.manual_seed(0)
    lengths = [5, 1, 9, 3]
    sequences = [torch.randint(0, VOCAB, (n,)) for n in lengths]
    packed = PackedSequences.from_lengths(lengths)
    monkeypatch.setattr(model.args, "activation_checkpointing", checkpointing)
    hidden = model.forward_hidden(torch.cat(sequences)[None], packed=packed).hidden_states[0]
    separate = torch.cat([model.forward_hidden(s[None]).hidden_states[0] for s in sequences])
    torch.testing.assert_close(hidden, separate, atol=1e-5, rtol=1e-5)
    weights = torch.randn_like(hidden)
    params = [p for p in model.parameters()]
    got = torch.autograd.grad((hidden * weights).sum(), params, allow_unused=True)
    expected = torch.autograd.grad((separate * weights).sum(), params, allow_unused=True)
    for g, e in zip(got, expected):
        if e is not None:  # fp32 sums in another order: relative to the gradient's scale
            torch.testing.assert_close(g, e, atol=1e-4 * float(e.abs().max()), rtol=1e-4)
    with pytest.raises(ValueError, match="neither an attention_mask"):
        model.forward_hidden(torch.cat(sequences)[None], attention_mask=torch.ones(1, sum(lengths)), packed=packed)


def make_samples(seed: int, count: int = 7) -> list[Sample]:
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for index in range(count):
        prompt = int(torch.randint(1, 6, (1,), generator=generator))
        # One empty completion: the loss must leave it out in both layouts.
        completion = 0 if index == 3 else int(torch.randint(1, 11, (1,), generator=generator))
        samples.append(Sample(
            torch.randint(0, VOCAB, (prompt,), generator=generator).tolist(),
            torch.randint(0, VOCAB, (completion,), generator=generator).tolist(),
            advantage=float(torch.randn(1, generator=generator)),
        ))
    return samples


def context(packing: bool, budget: int) -> StepContext:
    return StepContext(Runtime(), torch.device("cpu"), "fp32", pad_id=0, temperature=0.7,
                       micro_batch_tokens=budget, packing=packing)


def test_packed_scoring_and_update_equal_the_padded_ones(model):
    """Old / ref log-probs, recorded experts, the loss, its metrics and every gradient, with replay and KL."""
    is_moe = model.args.is_moe
    samples = {True: make_samples(1), False: make_samples(1)}
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.01 * torch.randn_like(p))
    policies = {}
    for packing, group in samples.items():
        # Budgets that give the two layouts different micro-batches: the result must not depend on them.
        step = context(packing, budget=24 if packing else 40)
        score_samples(step, model, group, "old_logps", record_routing=is_moe)
        score_samples(step, reference, group, "ref_logps")
        policy = copy.deepcopy(model)
        policy.train()
        gspo = GSPOConfig(beta=0.05, eps_low=0.2, eps_high=0.3)
        update = PolicyUpdate(step, policy, torch.optim.SGD(policy.parameters(), lr=0.0), gspo, 1.0,
                              routing_replay=is_moe, max_consecutive_skips=5)
        # A perturbed policy, so that ratios move off 1 and clipping happens.
        with torch.no_grad():
            for p in policy.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        policies[packing] = (policy, update.accumulate_gradients(group))
    for packed_sample, padded_sample in zip(samples[True], samples[False]):
        torch.testing.assert_close(packed_sample.old_logps, padded_sample.old_logps, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(packed_sample.ref_logps, padded_sample.ref_logps, atol=1e-5, rtol=1e-5)
        if is_moe:
            assert torch.equal(packed_sample.old_routing, padded_sample.old_routing)
    (packed_policy, packed_stats), (padded_policy, padded_stats) = policies[True], policies[False]
    # Per micro-batch, and the micro-batches differ; each is checked against its own tokens elsewhere.
    packed_stats.pop("expert_imbalance", None), padded_stats.pop("expert_imbalance", None)
    assert packed_stats.keys() == padded_stats.keys()
    for key, value in padded_stats.items():
        assert packed_stats[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    assert padded_stats["clip_frac"] > 0
    for (name, p), q in zip(packed_policy.named_parameters(), padded_policy.parameters()):
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, q.grad, atol=1e-4 * float(q.grad.abs().max()), rtol=1e-4, msg=name)


def test_spread_lengths_are_log_normal_within_their_range():
    from gspo_engine.benchmarks.e2e_spread import spread_lengths

    lengths = spread_lengths(4000, 16, 4096)
    assert min(lengths) >= 16 and max(lengths) <= 4096
    assert lengths == spread_lengths(4000, 16, 4096)
    # Median at the ends' geometric mean; about 2.3% beyond each two-sigma end, clipped onto it.
    assert 230 < sorted(lengths)[2000] < 285
    assert 0.01 < lengths.count(4096) / 4000 < 0.04 and 0.01 < lengths.count(16) / 4000 < 0.04
