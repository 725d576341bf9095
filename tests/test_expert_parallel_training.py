"""Expert parallelism in a whole run (torchrun, gloo on CPU): 2 and 4 ranks whose experts are split over
groups of 2 or 4 train like one process on the same global batch, generation under it samples the tokens
of one process, and distributed.expert_parallel is checked against the ranks and the model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from gspo_engine.config import ConfigError, load_config
from gspo_engine.distributed.rules import check_expert_parallel
from test_distributed import (SETTINGS, assert_same_weights, metrics, ok, resume_from, run_together, train_args,
                              weights)

ROOT = Path(__file__).resolve().parents[1]

# (ranks, distributed.expert_parallel): every rank its own block of experts (2 x 2, 4 x 4), and two
# replicas of a pair of ranks (4 x 2), whose expert gradients are summed over the replicas.
LAYOUTS = [(2, 2), (4, 4), (4, 2)]


def name_of(layout: tuple[int, int]) -> str:
    return f"ranks{layout[0]}_ep{layout[1]}"


def generation_case(ranks: int, folder: Path) -> dict:
    """A MoE checkpoint, prompts shared unevenly over `ranks` (the ranks run different numbers of forwards)
    and what one process samples for them; the spec tests/ep_rollout_ranks.py reads."""
    from gspo_engine import generate, load_pretrained
    from gspo_engine.model.kv_cache import slot_bytes
    from tiny_checkpoints import build_hf_model, save_hf_model

    folder.mkdir(parents=True)
    checkpoint = save_hf_model(build_hf_model(moe=True, num_experts=8, norm_topk_prob=True), folder / "moe")
    model = load_pretrained(checkpoint)
    generator = torch.Generator().manual_seed(3)
    lengths = [3, 9, 1, 6, 4, 8, 2, 7, 5, 3]
    prompts = [torch.randint(0, model.args.vocab_size, (n,), generator=generator).tolist() for n in lengths]
    max_new, seed = 9, 5
    free = generate(model, prompts, max_new_tokens=max_new, temperature=1.0, seed=seed, sample_ids=list(range(10)))
    firsts = {}
    for tokens in free.tokens:
        for token in set(tokens[2:6]):
            firsts[token] = firsts.get(token, 0) + 1
    eos = min(token for token, n in firsts.items() if 2 <= n <= 5)  # some completions end early
    single = generate(model, prompts, max_new_tokens=max_new, temperature=1.0, seed=seed,
                      sample_ids=list(range(10)), eos_token_id=eos)
    shares = {2: [[0, 2, 4, 5, 6, 8, 9], [1, 3, 7]], 4: [[0, 4, 5, 6, 7], [1], [2, 8], [3, 9]]}[ranks]
    budget = 2.5 * slot_bytes(model.args, max(lengths) + max_new - 1, torch.float32) / 1e9  # 2 slots per rank
    spec = {"prompts": prompts, "rows": shares, "max_new_tokens": max_new, "temperature": 1.0, "seed": seed,
            "eos": eos, "kv_cache_gb": budget}
    (folder / "spec.json").write_text(json.dumps(spec))
    command = {"module": "ep_rollout_ranks", "args": [str(checkpoint), str(folder / "spec.json"), str(folder / "out.pt")]}
    return {"single": single, "shares": shares, "out": folder / "out.pt", "command": command}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every run of this file, in two rounds of three launches side by side: one process, 2 ranks and 4 ranks
    (each launch runs its runs one after another in one process group); the second round resumes and
    exports the first one's checkpoints.

    The runs: tiny-moe in one process and under each layout; the router aux loss on and the sampler's own
    log-probs and experts replayed, 2 ranks with FSDP2 alone against 2 ranks with expert_parallel 2 (the
    same micro-batches, so the aux loss, averaged per micro-batch, is comparable); tiny-next in one process
    and with expert_parallel 2; generation under expert parallelism on 2 and 4 ranks."""
    base = tmp_path_factory.mktemp("expert_parallel")
    config = base / "config.yaml"
    config.write_text(yaml.safe_dump(SETTINGS))  # tiny-moe: 8 experts; routing replay, KL, checkpointing on
    aux_config = base / "aux.yaml"
    aux_config.write_text(yaml.safe_dump(SETTINGS | {
        "model": SETTINGS["model"] | {"router_aux_loss_coef": 0.01},
        "gspo": SETTINGS["gspo"] | {"old_logps": "rollout"},
    }))
    next_config = base / "next.yaml"
    next_config.write_text(yaml.safe_dump(SETTINGS | {"model": SETTINGS["model"] | {"name_or_path": "tiny-next"}}))
    out = {"config": config}
    for name in ("single", "aux_fsdp", "aux_ep", "next_single", "next_ep", "resumed_ep4", "resumed_single", "hf",
                 *map(name_of, LAYOUTS)):
        out[name] = base / name
    generation = {ranks: generation_case(ranks, base / f"generation{ranks}") for ranks in (2, 4)}
    out["generation"] = generation

    def ep(layout):
        return "--set", f"distributed.expert_parallel={layout}"

    plain, two, four = run_together(
        (None, {"single": train_args(config, out["single"]),
                "next_single": train_args(next_config, out["next_single"])}, base / "logs_plain"),
        (2, {name_of((2, 2)): train_args(config, out[name_of((2, 2))], *ep(2)),
             "aux_fsdp": train_args(aux_config, out["aux_fsdp"]),
             "aux_ep": train_args(aux_config, out["aux_ep"], *ep(2)),
             "next_ep": train_args(next_config, out["next_ep"], *ep(2)),
             "generation2": generation[2]["command"]}, base / "logs_2"),
        (4, {name_of((4, 4)): train_args(config, out[name_of((4, 4))], *ep(4)),
             name_of((4, 2)): train_args(config, out[name_of((4, 2))], *ep(2))}, base / "logs_4"),
    )
    logs = plain | two | four
    checkpoint = out[name_of((2, 2))] / "checkpoint-1"
    out["resumed_from"] = checkpoint
    if (checkpoint / "sharded").exists():
        resume_from(checkpoint, out["resumed_ep4"])
        resume_from(checkpoint, out["resumed_single"])
    plain, four = run_together(
        (None, {"resumed_single": train_args(config, out["resumed_single"], "--resume"),
                "export": ["export", str(out[name_of((4, 4))] / "checkpoint-1"), "--output", str(out["hf"])]},
         base / "logs_plain_after"),
        (4, {"resumed_ep4": train_args(config, out["resumed_ep4"], "--resume", *ep(4)),
             "generation4": generation[4]["command"]}, base / "logs_4_after"),
    )
    out["logs"] = logs | plain | four
    return out


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS, ids=[f"{r}ranks_ep{ep}" for r, ep in LAYOUTS])
def test_expert_parallel_ranks_train_like_one_process(runs, layout):
    ok(runs["logs"]["single"])
    log = ok(runs["logs"][name_of(layout)])
    single, split = metrics(runs["single"]), metrics(runs[name_of(layout)])
    assert len(single) == len(split) == 2
    for a, b in zip(single, split):
        assert a["reward_mean"] == b["reward_mean"]  # the same completions were sampled
        for key in ("loss", "grad_norm", "ratio_mean", "clip_frac", "kl", "response_len_mean"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key
    assert_same_weights(runs["single"] / "final", runs[name_of(layout)] / "final")
    start, end = weights(runs["single"] / "tiny-moe"), weights(runs["single"] / "final")
    experts = [key for key in start if ".experts." in key]
    assert experts and max((start[k] - end[k]).abs().max().item() for k in experts) > 1e-4  # the experts moved
    assert f"experts split over groups of {layout[1]}" in log.stdout


@pytest.mark.slow
def test_a_checkpoint_written_with_ep_2_is_sharded_by_expert_and_resumes_with_ep_4_and_in_one_process(runs):
    import torch.distributed.checkpoint as dcp

    from gspo_engine.distributed.sharded_checkpoint import SHARDED_DIR, is_sharded_checkpoint

    assert is_sharded_checkpoint(runs["resumed_from"])
    # The whole tensor's shape, each rank's block of 4 experts (with 4 ranks in 2 replicas, each block once).
    for layout in ((2, 2), (4, 2)):
        stored = dcp.FileSystemReader(runs[name_of(layout)] / "checkpoint-1" / SHARDED_DIR).read_metadata()
        for key in ("model.layers.0.mlp.gate_up", "optimizer.state.layers.0.mlp.gate_up.exp_avg_sq"):
            assert tuple(stored.state_dict_metadata[key].size) == (8, 64, 64)
            chunks = stored.state_dict_metadata[key].chunks
            assert sorted(tuple(chunk.offsets) for chunk in chunks) == [(0, 0, 0), (4, 0, 0)]

    for name in ("resumed_ep4", "resumed_single"):
        result = ok(runs["logs"][name])
        assert "resumed from" in result.stdout and "at step 1" in result.stdout, name
        assert_same_weights(runs["single"] / "final", runs[name] / "final")
        assert metrics(runs[name])[-1]["loss"] == pytest.approx(metrics(runs["single"])[-1]["loss"], rel=1e-5,
                                                                abs=1e-7), name
    assert "experts split over groups of 4" in runs["logs"]["resumed_ep4"].stdout


@pytest.mark.slow
def test_export_and_final_of_an_expert_parallel_run_load_in_transformers(runs):
    from transformers import AutoModelForCausalLM

    from gspo_engine.hf_checkpoint import load_pretrained

    ok(runs["logs"]["export"])
    out = runs["hf"]
    assert_same_weights(runs["single"] / "checkpoint-1", out)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    for folder in (out, runs[name_of((4, 4))] / "final"):
        model = AutoModelForCausalLM.from_pretrained(folder)
        assert model.config.num_experts == 8
        ours = load_pretrained(folder, dtype=torch.float32)
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, ours(ids), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [2, 4])
def test_generation_under_expert_parallelism_samples_the_tokens_of_one_process(runs, ranks):
    case = runs["generation"][ranks]
    ok(runs["logs"][f"generation{ranks}"])
    out = torch.load(case["out"])
    assert [share["rows"] for share in out] == case["shares"]
    for share in out:
        for row, tokens, logps in zip(share["rows"], share["tokens"], share["logps"]):
            assert tokens == case["single"].tokens[row], row
            torch.testing.assert_close(torch.tensor(logps), case["single"].logps[row], rtol=0, atol=1e-5)
    # The ranks that finished first kept serving the others' exchanges for more than the closing forward.
    assert max(share["idle_forwards"] for share in out) > 1
    assert min(share["idle_forwards"] for share in out) == 1


def test_expert_parallel_is_checked_against_the_ranks_and_the_model():
    config = load_config(None, ["distributed.expert_parallel=4"])
    check_expert_parallel(config, 8, num_experts=128, is_moe=True)
    check_expert_parallel(config, 4, num_experts=8, is_moe=True)
    with pytest.raises(ConfigError, match=r"distributed.expert_parallel \(4\) must divide the number of ranks/GPUs \(6\)"):
        check_expert_parallel(config, 6, num_experts=8, is_moe=True)
    with pytest.raises(ConfigError, match=r"distributed.expert_parallel \(4\) must divide the number of experts \(6\)"):
        check_expert_parallel(config, 4, num_experts=6, is_moe=True)
    with pytest.raises(ConfigError, match=r"distributed.expert_parallel \(4\): expert parallelism splits the experts "
                                          "of a MoE model"):
        check_expert_parallel(config, 4, num_experts=0, is_moe=False)
    check_expert_parallel(config, 1, num_experts=6, is_moe=False)  # one process holds every expert: not applied
    check_expert_parallel(load_config(None, []), 4, num_experts=0, is_moe=False)  # 1 is off
    with pytest.raises(ConfigError, match="distributed.expert_parallel"):
        load_config(None, ["distributed.expert_parallel=0"])


def test_one_gpu_plans_without_expert_parallelism_and_several_with_it():
    from gspo_engine.planner import make_plan

    config = load_config(ROOT / "configs" / "moe.yaml")  # distributed.expert_parallel: 8
    assert make_plan(config, gpus=1).memory.expert_parallel == 1
    assert make_plan(config, gpus=8).memory.expert_parallel == 8
    with pytest.raises(ConfigError, match=r"distributed.expert_parallel \(8\) must divide the number of ranks/GPUs"):
        make_plan(config, gpus=4)


@pytest.mark.slow
def test_aux_loss_expert_metrics_and_rollout_routing_replay_under_expert_parallelism(runs):
    ok(runs["logs"]["aux_fsdp"]), ok(runs["logs"]["aux_ep"])
    fsdp, ep = metrics(runs["aux_fsdp"]), metrics(runs["aux_ep"])
    assert len(fsdp) == len(ep) == 2
    for a, b in zip(fsdp, ep):
        assert a["reward_mean"] == b["reward_mean"]
        assert a["aux_loss"] > 0
        for key in ("loss", "aux_loss", "grad_norm", "ratio_mean", "kl", "expert_imbalance"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key
    assert_same_weights(runs["aux_fsdp"] / "final", runs["aux_ep"] / "final")


@pytest.mark.slow
def test_the_hybrid_model_under_expert_parallelism_trains_like_one_process(runs):
    """Qwen3-Next's MoE layers (routed experts split over the ranks, the shared expert under FSDP2)."""
    ok(runs["logs"]["next_single"]), ok(runs["logs"]["next_ep"])
    single, split = metrics(runs["next_single"]), metrics(runs["next_ep"])
    assert len(single) == len(split) == 2
    for a, b in zip(single, split):
        assert a["reward_mean"] == b["reward_mean"]
        for key in ("loss", "grad_norm", "kl"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key
    from safetensors.torch import load_file

    def all_weights(folder: Path) -> dict[str, torch.Tensor]:
        return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}

    wa, wb = all_weights(runs["next_single"] / "final"), all_weights(runs["next_ep"] / "final")
    assert wa.keys() == wb.keys() and any(".experts." in key for key in wa)
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=0, atol=1e-5, msg=key)
