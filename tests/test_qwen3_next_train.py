"""GSPO training of the embedded tiny Qwen3-Next end to end (CPU): packed updates, rollouts, routing replay, saves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gspo_engine.batching import Sample, collate
from gspo_engine.config import load_config
from gspo_engine.scoring import score_samples
from gspo_engine.trainer import GSPOTrainer
from test_trainer import quiet, tiny_config

CONFIGS = Path(__file__).parent.parent / "configs"


def test_a_short_run_saves_a_model_transformers_loads(tmp_path):
    from transformers import AutoModelForCausalLM, Qwen3NextForCausalLM

    trainer = GSPOTrainer(tiny_config(tmp_path, model="tiny-next", logging={"every": 1}), echo=quiet)
    summary = trainer.train()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all(r["grad_norm"] > 0 and r["expert_imbalance"] >= 1 for r in records)
    hf = AutoModelForCausalLM.from_pretrained(summary.final_dir).eval()
    assert isinstance(hf, Qwen3NextForCausalLM)
    ids = torch.tensor([[3, 4, 5, 12, 7, 7, 2]])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, trainer.model.eval()(ids), atol=1e-4, rtol=1e-4)


def test_gradients_do_not_depend_on_how_sequences_are_packed(tmp_path):
    """Micro-batch budgets that cut the samples into different packed rows give the same gradients."""
    trainer = GSPOTrainer(tiny_config(tmp_path, model="tiny-next", gspo={"beta": 0.1}), echo=quiet)
    generator = torch.Generator().manual_seed(0)
    samples = []
    for i in range(6):
        prompt = torch.randint(2, 16, (2 + i % 3,), generator=generator).tolist()
        completion = torch.randint(0, 16, (1 + (5 * i) % 4,), generator=generator).tolist()
        samples.append(Sample(prompt, completion, advantage=float(torch.randn(1, generator=generator))))
    score_samples(trainer.context, trainer.model, samples, "old_logps")
    score_samples(trainer.context, trainer.reference, samples, "ref_logps")
    for sample in samples:  # move the ratio off 1 so clipping and the ratio both matter
        sample.old_logps = sample.old_logps + 0.05 * torch.randn(sample.old_logps.shape, generator=generator)
    grads = []
    for budget in (10_000, 12, 1):
        trainer.context.micro_batch_tokens = budget
        trainer.model.train()
        trainer.updater.accumulate_gradients(samples)
        grads.append({n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None})
        trainer.optimizer.zero_grad(set_to_none=True)
    assert any("linear_attn" in name for name in grads[0])
    for other in grads[1:]:
        for name, grad in grads[0].items():
            torch.testing.assert_close(other[name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_routing_replay_forces_the_routed_experts(tmp_path):
    config = tiny_config(tmp_path, model="tiny-next", train={"steps": 1})
    config.model.routing_replay = True
    trainer = GSPOTrainer(config, echo=quiet)
    samples = [Sample([14, 3, 4, 12], [3, 4, 0], advantage=1.0), Sample([14, 5, 12], [5, 0], advantage=-1.0)]
    score_samples(trainer.context, trainer.model, samples, "old_logps", record_routing=True)
    layers = len(trainer.model.args.moe_layers)
    assert samples[0].old_routing.shape == (samples[0].num_positions, layers, trainer.model.args.num_experts_per_tok)
    for sample in samples:  # experts the free router would not pick: replay must use them anyway
        sample.old_routing = (sample.old_routing + 1) % trainer.model.args.num_experts
    batch = collate(samples, trainer.pad_id)
    _, _, _, routing = trainer.updater.micro_batch_loss(batch, samples)
    length = batch.input_ids.shape[1]
    for layer, layer_routing in enumerate(routing):
        used = layer_routing.expert_indices.view(len(samples), length, -1)
        for row, sample in enumerate(samples):
            assert torch.equal(used[row, : sample.num_positions], sample.old_routing[:, layer].long())


@pytest.mark.slow
def test_tiny_next_learns_the_builtin_task(tmp_path):
    config = load_config(CONFIGS / "tiny-next.yaml")
    config.output_dir = str(tmp_path / "run")
    summary = GSPOTrainer(config, echo=quiet).train()
    rewards = [json.loads(line)["reward_mean"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert summary is not None and len(rewards) == config.train.steps
    first, last = sum(rewards[:10]) / 10, sum(rewards[-10:]) / 10
    assert last > first + 0.25, (first, last)
