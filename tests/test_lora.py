"""LoRA: adapters on the projections (PEFT) and on the grouped experts (ours), training, PEFT files, merged export."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from test_trainer import quiet, tiny_config, weights
from tiny_checkpoints import build_hf_model, save_hf_model

import gspo_kernels as gk
from gspo_engine.batching import Sample
from gspo_engine.hf_checkpoint import load_pretrained
from gspo_engine.cli import main
from gspo_engine.config import ConfigError, LoraConfig, config_from_dict, load_config
from gspo_engine.lora import (
    ExpertLoRA,
    adapter_parameter_count,
    adapter_parameters,
    adapters_disabled,
    add_lora,
    export_merged,
    has_lora,
    load_adapted,
    merge_lora,
    save_adapters,
)
from gspo_engine.planner import make_plan
from gspo_engine.tiny import build_tiny_checkpoint
from gspo_engine.scoring import score_reference, score_samples
from gspo_engine.trainer import GSPOTrainer, TrainingError

ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "router", "experts"]
SAVED = ["embed_tokens", "lm_head"]
TINY_MOE_CONFIG = Path(__file__).parent.parent / "configs" / "tiny-moe.yaml"
TINY_MOE_LORA_CONFIG = Path(__file__).parent.parent / "configs" / "tiny-moe-lora.yaml"
IDS = torch.tensor([[3, 4, 5, 12, 7, 9], [8, 2, 11, 5, 6, 3]])


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {name: build_tiny_checkpoint(name, root / name) for name in ("tiny-moe", "tiny-dense")}


def randomize_adapters(model, seed=0, scale=0.2):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in adapter_parameters(model):
            parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype) * scale)


# ------------------------------------------------------------------ adapters on the model
@pytest.mark.parametrize("name", ["tiny-moe", "tiny-dense"])
def test_zero_initialised_adapters_leave_logits_unchanged_and_only_they_train(tiny_folders, name):
    model = load_pretrained(tiny_folders[name], dtype=torch.float32)
    with torch.no_grad():
        before = model(IDS)
    lora = LoraConfig(rank=4, targets=ALL_TARGETS)
    add_lora(model, lora)
    with torch.no_grad():
        assert torch.equal(model(IDS), before)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n or ".expert_lora." in n for n in trainable)
    assert sum(p.numel() for p in adapter_parameters(model)) == adapter_parameter_count(
        load_pretrained(tiny_folders[name]), lora
    )
    assert any(".expert_lora." in n for n in trainable) == (name == "tiny-moe")
    randomize_adapters(model)
    with torch.no_grad():
        assert not torch.allclose(model(IDS), before)
        with adapters_disabled(model):
            assert torch.equal(model(IDS), before)  # the GSPO reference policy
    assert all(p.requires_grad for p in adapter_parameters(model))


def saved_copies(model):
    return {name: p for name, p in model.named_parameters() if ".modules_to_save." in name}


@pytest.mark.parametrize("name, saved, copies", [
    ("tiny-moe", SAVED, ["embed_tokens", "lm_head"]),
    ("tiny-moe", ["lm_head"], ["lm_head"]),
    # tiny-dense ties lm_head to embed_tokens: one matrix, trained in both places whichever is named.
    ("tiny-dense", SAVED, ["embed_tokens"]),
    ("tiny-dense", ["lm_head"], ["embed_tokens"]),
])
def test_saved_modules_train_whole_fp32_copies_that_switch_off_with_the_adapters(tiny_folders, name, saved, copies):
    model = load_pretrained(tiny_folders[name], dtype=torch.bfloat16)
    with torch.no_grad():
        before = model(IDS)
    lora = LoraConfig(rank=4, targets=ALL_TARGETS, modules_to_save=saved)
    add_lora(model, lora)
    assert sorted(saved_copies(model)) == [f"{module}.modules_to_save.default.weight" for module in copies]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in trainable if ".lora_" in n or ".expert_lora." in n} | set(saved_copies(model))
    assert sum(p.numel() for p in adapter_parameters(model)) == adapter_parameter_count(
        load_pretrained(tiny_folders[name]), lora
    )
    assert all(p.dtype == torch.float32 for p in saved_copies(model).values())
    with torch.no_grad():
        for copy in saved_copies(model).values():
            copy.normal_(0, 0.5)
        with adapters_disabled(model):
            assert torch.equal(model(IDS), before)  # the originals, frozen and in the base dtype
    assert all(p.requires_grad for p in adapter_parameters(model))
    output_copy = model.lm_head_weight
    assert output_copy is saved_copies(model)[f"{copies[-1]}.modules_to_save.default.weight"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(IDS).float().logsumexp(-1).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in saved_copies(model).values())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        adapted = model(IDS).float()
        merge_lora(model)
        torch.testing.assert_close(model(IDS).float(), adapted, atol=0.05, rtol=0.05)
    assert set(model.state_dict()) == set(load_pretrained(tiny_folders[name]).state_dict())
    assert model.embed_tokens.weight.dtype == torch.bfloat16


def test_merge_removes_the_adapters_and_keeps_the_logits(tiny_folders):
    model = load_pretrained(tiny_folders["tiny-moe"], dtype=torch.float32)
    add_lora(model, LoraConfig(rank=4, targets=ALL_TARGETS))
    randomize_adapters(model)
    with torch.no_grad():
        adapted = model(IDS)
        merge_lora(model)
        torch.testing.assert_close(model(IDS), adapted, atol=1e-5, rtol=1e-5)
    assert not has_lora(model) and model.layers[0].mlp.expert_lora is None
    assert set(model.state_dict()) == set(load_pretrained(tiny_folders["tiny-moe"]).state_dict())


def test_bf16_base_weights_train_fp32_adapters_under_autocast(tiny_folders):
    model = load_pretrained(tiny_folders["tiny-moe"], dtype=torch.bfloat16)
    add_lora(model, LoraConfig(rank=4, targets=ALL_TARGETS))
    randomize_adapters(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(IDS)
    logits.float().logsumexp(-1).mean().backward()
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            assert parameter.dtype == torch.float32 and parameter.grad is not None and parameter.grad.abs().sum() > 0, name
        else:
            assert parameter.dtype == torch.bfloat16 and parameter.grad is None, name


def test_bf16_base_weights_train_under_bf16_mixed(tmp_path):
    config = tiny_config(tmp_path, train={"steps": 2, "precision": "bf16-mixed"})
    config.lora = LoraConfig(rank=4, base_bf16=True)
    trainer = GSPOTrainer(config, echo=quiet)
    before = weights(trainer.model)
    trainer.train()
    for name, parameter in trainer.model.named_parameters():
        if parameter.requires_grad:
            assert parameter.dtype == torch.float32, name
        else:
            assert parameter.dtype == torch.bfloat16 and torch.equal(parameter, before[name]), name
    assert any(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters() if p.requires_grad)


def test_bf16_base_weights_need_bf16_mixed(tmp_path):
    config = tiny_config(tmp_path)
    config.lora = LoraConfig(rank=4, base_bf16=True)
    with pytest.raises(TrainingError, match="lora.base_bf16 needs train.precision bf16-mixed"):
        GSPOTrainer(config, echo=quiet)


# ------------------------------------------------------------------ grouped-expert LoRA
def per_expert_reference(x, topk_idx, topk_weights, w_gate_up, w_down, adapter):
    """Every (token, slot) on its own with the expert's dense adapted weights W + s B A."""
    s = adapter.scaling
    gate_up = w_gate_up + s * adapter.gate_up_B @ adapter.gate_up_A
    down = w_down + s * adapter.down_B @ adapter.down_A
    rows = []
    for n in range(x.shape[0]):
        y = torch.zeros_like(x[n])
        for j in range(topk_idx.shape[1]):
            e = topk_idx[n, j]
            gate, up = (gate_up[e] @ x[n]).chunk(2)
            y = y + topk_weights[n, j] * (down[e] @ (F.silu(gate) * up))
        rows.append(y)
    return torch.stack(rows)


def test_grouped_expert_lora_matches_a_per_expert_reference_in_values_and_gradients():
    torch.manual_seed(0)
    tokens, experts, hidden, inter, k, rank = 11, 5, 8, 6, 2, 3
    x = torch.randn(tokens, hidden, dtype=torch.float64, requires_grad=True)
    logits = torch.randn(tokens, experts, dtype=torch.float64)
    logits[:, -1] = -1e9  # the last expert gets no token: its factors must get exactly zero gradient
    topk_weights, topk_idx = gk.moe_route(logits.requires_grad_(), k)
    w_gate_up = torch.randn(experts, 2 * inter, hidden, dtype=torch.float64) * 0.3
    w_down = torch.randn(experts, hidden, inter, dtype=torch.float64) * 0.3
    adapter = ExpertLoRA(experts, hidden, inter, rank, alpha=6.0).double()
    with torch.no_grad():
        adapter.gate_up_B.normal_(0, 0.3)
        adapter.down_B.normal_(0, 0.3)

    inputs = [x, logits, *adapter.parameters()]
    out = adapter(x, topk_idx, topk_weights, w_gate_up, w_down)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, grad_out, retain_graph=True)  # the routing graph is shared
    expected = per_expert_reference(x, topk_idx, topk_weights, w_gate_up, w_down, adapter)
    expected_grads = torch.autograd.grad(expected, inputs, grad_out)
    torch.testing.assert_close(out, expected)
    for name, got, want in zip(["x", "router logits", *dict(adapter.named_parameters())], grads, expected_grads):
        torch.testing.assert_close(got, want, msg=name)
    assert torch.all(grads[2][-1] == 0) and torch.all(grads[3][-1] == 0)

    adapter.enabled = False
    torch.testing.assert_close(adapter(x, topk_idx, topk_weights, w_gate_up, w_down),
                               gk.moe_experts(x, topk_idx, topk_weights, w_gate_up, w_down))


# ------------------------------------------------------------------ PEFT files, transformers, merged export
def saved_adapters(tmp_path, lora, **model_options):
    """A tiny transformers checkpoint in tmp_path/base, our model on it with random adapters (saved in
    tmp_path/adapters), and that model's logits of IDS."""
    base = save_hf_model(build_hf_model(**model_options), tmp_path / "base")
    model = load_pretrained(base, dtype=torch.float32)
    add_lora(model, lora)
    randomize_adapters(model, scale=0.3)
    save_adapters(model, lora, tmp_path / "adapters")
    with torch.no_grad():
        return base, model, model(IDS)


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_peft_loads_our_adapters_and_the_merged_export_matches(tmp_path, moe):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, _, ours = saved_adapters(tmp_path, LoraConfig(rank=4, alpha=8.0, targets=ALL_TARGETS), moe=moe)

    config = json.loads((tmp_path / "adapters" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["base_model_name_or_path"] == str(base.resolve())
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "adapters").eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(IDS).logits, ours, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(load_adapted(tmp_path / "adapters")(IDS), ours, atol=0, rtol=0)

    export_merged(tmp_path / "adapters", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(IDS).logits, ours, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("moe, tied, saved", [
    (True, False, SAVED),
    (False, False, ["lm_head"]),
    (False, True, ["embed_tokens"]),
    (False, True, ["lm_head"]),
], ids=["moe-both", "dense-lm_head", "tied-embed_tokens", "tied-lm_head"])
def test_peft_loads_our_saved_modules_and_the_merged_export_matches(tmp_path, moe, tied, saved):
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    lora = LoraConfig(rank=4, alpha=8.0, targets=ALL_TARGETS, modules_to_save=saved)
    base, model, ours = saved_adapters(tmp_path, lora, moe=moe, tie_word_embeddings=tied)

    config = json.loads((tmp_path / "adapters" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == (["embed_tokens"] if tied else saved)
    assert config["ensure_weight_tying"] == tied
    with safe_open(tmp_path / "adapters" / "adapter_model.safetensors", framework="pt") as f:
        whole = {key for key in f.keys() if ".lora_" not in key}
    keys = {"embed_tokens": "base_model.model.model.embed_tokens.weight", "lm_head": "base_model.model.lm_head.weight"}
    assert whole == ({keys["embed_tokens"], keys["lm_head"]} if tied else {keys[name] for name in saved})
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "adapters").eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(IDS).logits, ours, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(load_adapted(tmp_path / "adapters")(IDS), ours, atol=0, rtol=0)
        with peft_model.disable_adapter(), adapters_disabled(model):
            torch.testing.assert_close(peft_model(IDS).logits, model(IDS), atol=1e-4, rtol=1e-4)

    export_merged(tmp_path / "adapters", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(IDS).logits, ours, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------ training
def lora_config(tmp_path, rank=4, modules_to_save=(), **sections):
    config = tiny_config(tmp_path, **sections)
    config.lora = LoraConfig(rank=rank, targets=ALL_TARGETS, modules_to_save=list(modules_to_save))
    return config


@pytest.mark.parametrize("saved", [[], SAVED], ids=["adapters", "with-saved-modules"])
def test_training_changes_only_the_adapters_and_the_reference_is_the_base(tmp_path, saved):
    trainer = GSPOTrainer(lora_config(tmp_path, modules_to_save=saved, gspo={
        "beta": 0.05, "eps_low": 0.2, "eps_high": 0.28, "num_minibatches": 2}), echo=quiet)
    assert trainer.reference is None  # no second copy of the weights
    before = weights(trainer.model)
    summary = trainer.train()
    after = weights(trainer.model)
    adapters = {n for n, _ in trainer.model.named_parameters()
                if ".lora_" in n or ".expert_lora." in n or ".modules_to_save." in n}
    assert {n for n in before if not torch.equal(before[n], after[n])} == adapters
    assert {n for n in adapters if ".modules_to_save." in n} == {f"{m}.modules_to_save.default.weight" for m in saved}
    assert {id(p) for group in trainer.optimizer.param_groups for p in group["params"]} == {
        id(p) for p in adapter_parameters(trainer.model)
    }
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor([r["loss"], r["grad_norm"], r["kl"]])).all() for r in records)
    assert (summary.final_dir / "adapter_model.safetensors").is_file()

    samples = [Sample([3, 4, 5, 12], [4, 5, 2]), Sample([6, 7, 12], [7, 2])]
    score_reference(trainer.context, trainer.model, trainer.reference, samples)
    base = GSPOTrainer(tiny_config(tmp_path / "base"), echo=quiet)
    score_samples(base.context, base.model, samples, "old_logps")
    for sample in samples:
        torch.testing.assert_close(sample.ref_logps, sample.old_logps, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("saved", [[], SAVED], ids=["adapters", "with-saved-modules"])
def test_resumed_lora_run_ends_with_identical_adapters(tmp_path, saved):
    straight = GSPOTrainer(lora_config(tmp_path / "a", modules_to_save=saved, train={"steps": 4}), echo=quiet)
    straight.train()
    first = GSPOTrainer(lora_config(tmp_path / "b", modules_to_save=saved, train={"steps": 2},
                                    checkpoint={"every": 1, "keep_last": 1}), echo=quiet)
    first.train()
    first.save_checkpoint()
    assert (tmp_path / "b" / "run" / "checkpoint-2" / "adapter_config.json").is_file()
    resumed = GSPOTrainer(lora_config(tmp_path / "b", modules_to_save=saved, train={"steps": 4},
                                      checkpoint={"resume": "auto"}), echo=quiet)
    assert resumed.step == 2
    assert all(torch.equal(p, weights(first.model)[n]) for n, p in saved_copies(resumed.model).items())
    resumed.train()
    want, got = weights(straight.model), weights(resumed.model)
    for name in want:
        assert torch.equal(want[name], got[name]), name
    if saved:
        with pytest.raises(ValueError, match="does not fit the model's adapters"):
            GSPOTrainer(lora_config(tmp_path / "b", checkpoint={"resume": "auto"}), echo=quiet)


def test_resuming_with_other_training_settings_says_why(tmp_path):
    GSPOTrainer(lora_config(tmp_path / "lora", train={"steps": 1}, checkpoint={"every": 1}), echo=quiet).save_checkpoint()
    GSPOTrainer(tiny_config(tmp_path / "full", train={"steps": 1}), echo=quiet).save_checkpoint()
    with pytest.raises(TrainingError, match="holds LoRA adapters"):
        GSPOTrainer(tiny_config(tmp_path / "lora", checkpoint={"resume": "auto"}), echo=quiet)
    with pytest.raises(TrainingError, match="holds full weights, not LoRA adapters"):
        GSPOTrainer(lora_config(tmp_path / "full", checkpoint={"resume": "auto"}), echo=quiet)
    with pytest.raises(ValueError, match="does not fit the model's adapters"):
        config = lora_config(tmp_path / "lora", checkpoint={"resume": "auto"})
        config.lora.targets = ["q_proj"]
        GSPOTrainer(config, echo=quiet)


def test_cli_trains_lora_and_exports_a_merged_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM

    runner = CliRunner()
    result = runner.invoke(main, [
        "train", str(TINY_MOE_CONFIG), "--lora_rank", "8", "--output_dir", str(tmp_path / "run"),
        "--set", "train.steps=2", "--set", "rollout.prompts_per_step=2", "--set", "rollout.group_size=4",
    ], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "LoRA rank 8" in result.output and "done: 2 steps" in result.output
    result = runner.invoke(main, ["export", str(tmp_path / "run"), "--merge", "--output", str(tmp_path / "merged")],
                           catch_exceptions=False)
    assert result.exit_code == 0, result.output
    adapted = load_adapted(tmp_path / "run" / "final")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(IDS).logits, adapted(IDS), atol=1e-4, rtol=1e-4)
    result = runner.invoke(main, ["export", str(tmp_path / "run" / "checkpoint-2"), "--output", str(tmp_path / "copy")])
    assert result.exit_code != 0 and "does not exist" in result.output
    result = runner.invoke(main, ["export", str(tmp_path / "run"), "--output", str(tmp_path / "copy")],
                           catch_exceptions=False)
    assert result.exit_code == 0 and (tmp_path / "copy" / "adapter_model.safetensors").is_file()
    result = runner.invoke(main, ["generate", str(tmp_path / "copy"), "--prompt", "<copy>12=", "--temperature", "0",
                                  "--max-new-tokens", "3"], catch_exceptions=False)
    assert result.exit_code == 0 and result.output.startswith("[0] '<copy>12=' -> ")


def test_cli_trains_saved_modules_exports_them_merged_and_generates_with_them(tmp_path, tiny_folders):
    from transformers import AutoModelForCausalLM

    runner = CliRunner()
    result = runner.invoke(main, [
        "train", str(TINY_MOE_LORA_CONFIG), "--output_dir", str(tmp_path / "run"),
        "--set", "train.steps=2", "--set", "rollout.prompts_per_step=2", "--set", "rollout.group_size=4",
    ], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "run" / "final" / "adapter_config.json").read_text())["modules_to_save"] == SAVED
    result = runner.invoke(main, ["export", str(tmp_path / "run"), "--merge", "--output", str(tmp_path / "merged")],
                           catch_exceptions=False)
    assert result.exit_code == 0, result.output
    adapted = load_adapted(tmp_path / "run" / "final")
    assert sorted(saved_copies(adapted)) == [f"{m}.modules_to_save.default.weight" for m in SAVED]
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(IDS).logits, adapted(IDS), atol=1e-4, rtol=1e-4)

    # Saved modules far from the base, adapters at zero: what generate prints comes from them.
    model = load_pretrained(tiny_folders["tiny-moe"], dtype=torch.float32)
    lora = LoraConfig(rank=4, modules_to_save=SAVED)
    add_lora(model, lora)
    with torch.no_grad():
        for copy in saved_copies(model).values():
            copy.normal_(0, 1.0, generator=torch.Generator().manual_seed(0))
    save_adapters(model, lora, tmp_path / "adapters")
    runner.invoke(main, ["export", str(tmp_path / "adapters"), "--merge", "--output", str(tmp_path / "merged2")],
                  catch_exceptions=False)
    outputs = {}
    for folder in ("adapters", "merged2"):
        result = runner.invoke(main, ["generate", str(tmp_path / folder), "--prompt", "<copy>12=", "--prompt",
                                      "<copy>345=", "--temperature", "0", "--max-new-tokens", "4"],
                               catch_exceptions=False)
        assert result.exit_code == 0, result.output
        outputs[folder] = result.output
    result = runner.invoke(main, ["generate", str(tiny_folders["tiny-moe"]), "--prompt", "<copy>12=", "--prompt",
                                  "<copy>345=", "--temperature", "0", "--max-new-tokens", "4"], catch_exceptions=False)
    assert outputs["adapters"] == outputs["merged2"] != result.output


@pytest.mark.slow
def test_lora_on_the_tiny_moe_learns(tmp_path):
    config = load_config(TINY_MOE_CONFIG, [f"output_dir={tmp_path / 'run'}", "lora.rank=8"])
    summary = GSPOTrainer(config, echo=quiet).train()
    # The adapters leave the embeddings and the lm_head frozen, which carry most of what full fine-tuning
    # of this random model learns (0.15 -> 0.59); LoRA matches full fine-tuning of the same weights (+0.03).
    assert summary.last_reward_mean > summary.first_reward_mean + 0.03


@pytest.mark.slow
def test_lora_with_saved_modules_on_the_tiny_moe_learns_visibly(tmp_path):
    config = load_config(TINY_MOE_LORA_CONFIG, [f"output_dir={tmp_path / 'run'}"])
    GSPOTrainer(config, echo=quiet).train()
    rewards = [json.loads(line)["reward_mean"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first, last = sum(rewards[:10]) / 10, sum(rewards[-10:]) / 10
    assert last >= 1.5 * first and last >= first + 0.15, (first, last)


# ------------------------------------------------------------------ config and plan
@pytest.mark.parametrize(
    "lora, message",
    [
        ({"rank": -1}, "lora.rank: -1 is not valid"),
        ({"rank": 8, "targets": ["qkv"]}, "lora.targets: ['qkv'] is not valid; choose some of q_proj"),
        ({"rank": 8, "dropout": 1.5}, "lora.dropout: 1.5 is not valid"),
        ({"rank": 8, "alpha": 0}, "lora.alpha: 0.0 is not valid"),
        ({"base_bf16": True}, "lora.base_bf16: only with LoRA"),
        ({"rank": 8, "base_bf16": True, "_precision": "fp32"}, "lora.base_bf16: needs train.precision bf16-mixed"),
        ({"rank": 8, "modules_to_save": ["embed_tokens", "norm"]},
         "lora.modules_to_save: ['embed_tokens', 'norm'] is not valid; choose some of embed_tokens, lm_head, or none"),
        ({"rank": 8, "modules_to_save": "lm_head"}, "lora.modules_to_save"),
        ({"modules_to_save": ["lm_head"]}, "lora.modules_to_save: only with LoRA"),
    ],
)
def test_lora_config_errors_name_the_key(lora, message):
    lora = dict(lora)
    data = {"lora": lora}
    if "_precision" in lora:
        data["train"] = {"precision": lora.pop("_precision")}
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        config_from_dict(data)


def test_plan_counts_adapters_and_their_optimizer_states_only():
    full = make_plan(config_from_dict({"model": {"name_or_path": "tiny-moe"}}))
    lora = make_plan(config_from_dict({"model": {"name_or_path": "tiny-moe"}, "lora": {"rank": 16}}))
    assert full.trainable_params == full.total_params and lora.lora_rank == 16
    assert lora.trainable_params == lora.total_params - full.total_params
    assert lora.train_memory_gib * 2**30 == pytest.approx(full.total_params * 4 + lora.trainable_params * 16)
    assert any("LoRA rank 16" in line for line in lora.lines())


@pytest.mark.parametrize("name, copies", [("tiny-moe", 2), ("tiny-dense", 1)])  # tiny-dense ties lm_head
def test_plan_counts_the_saved_modules_copies_as_trained(name, copies):
    from gspo_engine.planner.released_shapes import plan_model_args

    args, _ = plan_model_args(name)
    adapters = make_plan(config_from_dict({"model": {"name_or_path": name}, "lora": {"rank": 16}}))
    saved = make_plan(config_from_dict({"model": {"name_or_path": name}, "lora": {"rank": 16, "modules_to_save": SAVED}}))
    copy_params = copies * args.vocab_size * args.hidden_size
    assert saved.trainable_params == adapters.trainable_params + copy_params
    assert saved.total_params == adapters.total_params + copy_params
    assert (saved.train_memory_gib - adapters.train_memory_gib) * 2**30 == pytest.approx(copy_params * 16)
