"""The GSPO trainer end to end on the embedded tiny models (CPU, a few steps each)."""

import json

import pytest
import torch

from gspo_engine.batching import Sample
from gspo_engine.config import config_from_dict
from gspo_engine.scoring import score_samples
from gspo_engine.trainer import GSPOTrainer, TrainingError


def tiny_config(tmp_path, model="tiny-moe", **sections):
    data = {
        "model": {"name_or_path": model},
        "data": {"builtin": {"tasks": ["copy"], "min_length": 2, "max_length": 3, "num_rows": 64}},
        "rollout": {"prompts_per_step": 2, "group_size": 4, "max_new_tokens": 4},
        "gspo": {"eps_low": 0.2, "eps_high": 0.28, "num_minibatches": 2},
        "optim": {"learning_rate": 1e-3},
        "train": {"steps": 2},
        "output_dir": str(tmp_path / "run"),
    }
    for section, values in sections.items():
        data[section] = data.get(section, {}) | values if isinstance(values, dict) else values
    return config_from_dict(data)


def quiet(*_args, **_kwargs):
    pass


def weights(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_a_short_run_writes_metrics_curves_and_a_loadable_model(tmp_path):
    from transformers import AutoModelForCausalLM

    trainer = GSPOTrainer(tiny_config(tmp_path, logging={"every": 1}), echo=quiet)
    summary = trainer.train()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    required = {"reward_mean", "reward_std", "loss", "clip_frac", "ratio_mean", "response_len_mean", "grad_norm",
                "lr", "tokens_per_s", "rollout_s", "update_s", "reward/digit_match", "expert_imbalance"}
    assert required <= set(records[0])
    assert all(r["loss"] is not None and r["grad_norm"] > 0 for r in records)
    assert (tmp_path / "run" / "curves.png").stat().st_size > 0
    assert (tmp_path / "run" / "config.yaml").is_file()
    hf = AutoModelForCausalLM.from_pretrained(summary.final_dir).eval()
    ids = torch.tensor([[3, 4, 5, 12]])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, trainer.model.eval()(ids), atol=1e-4, rtol=1e-4)
    assert (summary.final_dir / "tokenizer.json").is_file()


@pytest.mark.parametrize("model", ["tiny-moe", "tiny-dense"])
def test_gradient_accumulation_is_exact(tmp_path, model):
    trainer = GSPOTrainer(tiny_config(tmp_path, model=model, gspo={"beta": 0.1}), echo=quiet)
    gen = torch.Generator().manual_seed(0)
    samples = []
    for i in range(6):
        prompt = torch.randint(2, 16, (2 + i % 3,), generator=gen).tolist()
        completion = torch.randint(0, 16, (1 + (5 * i) % 4,), generator=gen).tolist()
        samples.append(Sample(prompt, completion, advantage=float(torch.randn(1, generator=gen))))
    score_samples(trainer.context, trainer.model, samples, "old_logps")
    score_samples(trainer.context, trainer.reference, samples, "ref_logps")
    for sample in samples:  # move the ratio off 1 so clipping and the ratio both matter
        sample.old_logps = sample.old_logps + 0.05 * torch.randn(sample.old_logps.shape, generator=gen)

    grads = []
    for budget in (10_000, 12, 1):
        trainer.context.micro_batch_tokens = budget
        trainer.model.train()
        trainer.updater.accumulate_gradients(samples)
        grads.append({n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None})
        trainer.optimizer.zero_grad(set_to_none=True)
    assert grads[0]
    for other in grads[1:]:
        for name, grad in grads[0].items():
            torch.testing.assert_close(other[name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_resumed_run_ends_with_identical_weights(tmp_path):
    straight = GSPOTrainer(tiny_config(tmp_path / "a", train={"steps": 4}), echo=quiet)
    straight.train()

    first = GSPOTrainer(tiny_config(tmp_path / "b", train={"steps": 2}, checkpoint={"every": 1, "keep_last": 1}),
                        echo=quiet)
    first.train()
    assert sorted(p.name for p in (tmp_path / "b" / "run").glob("checkpoint-*")) == ["checkpoint-1"]
    # Resuming from step 1 runs step 2 again, and the run must not notice.
    resumed = GSPOTrainer(tiny_config(tmp_path / "b", train={"steps": 4}, checkpoint={"resume": "auto"}), echo=quiet)
    assert resumed.step == 1
    resumed.train()
    want, got = weights(straight.model), weights(resumed.model)
    for name in want:
        assert torch.equal(want[name], got[name]), name
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_non_finite_updates_are_skipped_then_stop_the_run(tmp_path, monkeypatch):
    import gspo_kernels

    real = gspo_kernels.fused_linear_gspo_loss

    def poisoned(*args, **kwargs):
        loss, metrics = real(*args, **kwargs)
        return loss * float("nan"), metrics

    trainer = GSPOTrainer(tiny_config(tmp_path, train={"steps": 5, "max_consecutive_skips": 3}), echo=quiet)
    before = weights(trainer.model)
    monkeypatch.setattr(gspo_kernels, "fused_linear_gspo_loss", poisoned)
    with pytest.raises(TrainingError, match="3 non-finite updates in a row"):
        trainer.train()
    assert trainer.skipped_updates == 3
    after = weights(trainer.model)
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_routing_replay_and_aux_loss_run(tmp_path):
    config = tiny_config(tmp_path, train={"steps": 1})
    config.model.routing_replay = True
    config.model.router_aux_loss_coef = 0.01
    trainer = GSPOTrainer(config, echo=quiet)
    trainer.train()
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert record["aux_loss"] > 0


def test_routing_replay_forces_the_recorded_experts(tmp_path):
    from gspo_engine.batching import collate

    config = tiny_config(tmp_path, train={"steps": 1})
    config.model.routing_replay = True
    trainer = GSPOTrainer(config, echo=quiet)
    samples = [Sample([14, 3, 4, 12], [3, 4, 0], advantage=1.0), Sample([14, 5, 12], [5, 0], advantage=-1.0)]
    score_samples(trainer.context, trainer.model, samples, "old_logps", record_routing=True)
    # Recorded experts that the free router would not pick: replay must use them anyway.
    for sample in samples:
        sample.old_routing = (sample.old_routing + 1) % trainer.model.args.num_experts
    batch = collate(samples, trainer.pad_id)
    _, _, _, routing = trainer.updater.micro_batch_loss(batch, samples)
    length = batch.input_ids.shape[1]
    for layer, layer_routing in enumerate(routing):
        used = layer_routing.expert_indices.view(len(samples), length, -1)
        for row, sample in enumerate(samples):
            assert torch.equal(used[row, : sample.num_positions], sample.old_routing[:, layer].long())


def test_routing_replay_with_the_samplers_log_probs_replays_the_rollouts_experts(tmp_path):
    config = tiny_config(tmp_path, train={"steps": 1}, gspo={"old_logps": "rollout"})
    config.model.routing_replay = True
    trainer = GSPOTrainer(config, echo=quiet)
    seen, free = [], []
    run = trainer.updater.run

    def update(samples):
        seen.extend(samples)
        # The experts a full forward of the policy picks before the update changes it.
        with torch.no_grad():
            tokens = torch.tensor([samples[0].prompt_ids + samples[0].completion_ids[:-1]])
            routing = trainer.model.eval().forward_hidden(tokens).routing
        free.append(torch.stack([r.expert_indices for r in routing], dim=1))
        return run(samples)

    trainer.updater.run = update
    trainer.train_step()
    layers, k = len(trainer.model.args.moe_layers), trainer.model.args.num_experts_per_tok
    assert seen and all(s.old_routing.shape == (s.num_positions, layers, k) for s in seen)
    assert torch.equal(seen[0].old_routing.long().sort(-1).values, free[0].sort(-1).values)


def test_bf16_mixed_precision_trains_with_fp32_master_weights(tmp_path):
    trainer = GSPOTrainer(tiny_config(tmp_path, train={"steps": 2, "precision": "bf16-mixed"}), echo=quiet)
    before = weights(trainer.model)
    trainer.train()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["loss"] is not None and r["grad_norm"] > 0 for r in records)
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    assert any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters())
