"""Continuous batching over KV-cache slots: the same completions under any budget, the slot cache's views,
the shapes a CUDA graph runs (checked eagerly here), and on CUDA the captured decode steps themselves."""

from __future__ import annotations

import json
import os

import pytest
import torch
from tiny_checkpoints import VOCAB, build_hf_model, save_hf_model

from gspo_engine import generate, load_pretrained
from gspo_engine.decoding import graphs
from gspo_engine.decoding.graphs import DecodeRunner, bucket
from gspo_engine.model.kv_cache import KVCache, slot_bytes

MAX_NEW = 10
# 24 prompts of 1 to 11 tokens: more than the largest budget below admits at once.
PROMPT_LENGTHS = [3, 11, 1, 7, 5, 9, 2, 8, 4, 6, 10, 3, 5, 1, 9, 7, 2, 11, 6, 4, 8, 3, 10, 5]
MODELS = {"dense": dict(moe=False), "moe": dict(moe=True, norm_topk_prob=True)}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=list(MODELS))
def model(request, tmp_path_factory):
    hf = build_hf_model(**MODELS[request.param])
    return load_pretrained(save_hf_model(hf, tmp_path_factory.mktemp(request.param)))


def make_prompts(seed: int = 11) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=generator).tolist() for n in PROMPT_LENGTHS]


def budget_for(model, prompts, sequences: int) -> float:
    """kv_cache_gb that holds `sequences` slots of this rollout's capacity (and not one more)."""
    capacity = max(len(p) for p in prompts) + MAX_NEW - 1
    return (sequences + 0.5) * slot_bytes(model.args, capacity, torch.float32) / 1e9


def an_eos_mid_way(completions: list[list[int]]) -> int:
    """A token some completions draw between their 3rd and 8th token: those end early, the rest run on."""
    counts = {}
    for tokens in completions:
        for token in set(tokens[2:8]):
            counts[token] = counts.get(token, 0) + 1
    ending = [token for token, n in counts.items() if 2 <= n <= len(completions) // 2]
    assert ending, completions
    return min(ending)


@pytest.mark.parametrize("temperature", [0.0, 0.9], ids=["greedy", "sampled"])
def test_completions_do_not_depend_on_the_budget(model, temperature):
    prompts = make_prompts()
    options = dict(max_new_tokens=MAX_NEW, temperature=temperature, seed=7,
                   sample_ids=[1000 + 3 * row for row in range(len(prompts))], return_routing=True)
    free_run = generate(model, prompts, **options)
    eos = an_eos_mid_way(free_run.tokens)
    unbounded = generate(model, prompts, eos_token_id=eos, **options)
    assert True in unbounded.finished and False in unbounded.finished
    assert unbounded.slots == len(prompts) and unbounded.active_min < unbounded.active_mean <= len(prompts)
    for sequences in (3, 17):
        budgeted = generate(model, prompts, eos_token_id=eos, kv_cache_gb=budget_for(model, prompts, sequences),
                            **options)
        assert budgeted.slots == sequences
        assert max(1, budgeted.active_min) <= budgeted.active_mean <= sequences
        assert budgeted.kv_cache_bytes <= sequences / len(prompts) * unbounded.kv_cache_bytes + 64
        assert budgeted.tokens == unbounded.tokens
        assert budgeted.finished == unbounded.finished
        for a, b in zip(budgeted.logps, unbounded.logps):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
        if unbounded.routing is not None:
            for a, b in zip(budgeted.routing, unbounded.routing):
                assert torch.equal(a, b)
        assert budgeted.decode_steps > unbounded.decode_steps


def test_a_completion_is_the_same_whatever_else_is_admitted_with_it(model):
    """Keys by sample id and token index: a prompt admitted late, among other prompts, draws what it draws alone."""
    prompts = make_prompts()
    ids = [50 + row for row in range(len(prompts))]
    everything = generate(model, prompts, max_new_tokens=MAX_NEW, temperature=1.0, seed=3, sample_ids=ids,
                          kv_cache_gb=budget_for(model, prompts, 2))
    for row in (0, len(prompts) - 1):
        alone = generate(model, [prompts[row]], max_new_tokens=MAX_NEW, temperature=1.0, seed=3, sample_ids=[ids[row]])
        assert alone.tokens[0] == everything.tokens[row]


def test_the_graph_shapes_give_the_same_completions(model, monkeypatch):
    """Rows and columns rounded up as the CUDA graphs run them (idle slots and unwritten columns included),
    run eagerly: the same tokens as the exact sizes."""
    prompts = make_prompts()
    options = dict(max_new_tokens=MAX_NEW, temperature=0.8, seed=1, kv_cache_gb=budget_for(model, prompts, 5))
    exact = generate(model, prompts, **options)
    monkeypatch.setattr(graphs, "SMALLEST_COLUMN_BUCKET", 4)
    monkeypatch.setattr(DecodeRunner, "sizes", lambda self, rows, columns: graphs.graph_sizes(
        rows, columns, self.slots, self.capacity))
    rounded = generate(model, prompts, **options)
    assert rounded.tokens == exact.tokens
    for a, b in zip(rounded.logps, exact.logps):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_buckets_are_powers_of_two_within_the_limit():
    assert [bucket(n, 48) for n in (1, 2, 3, 5, 16, 17, 33, 48)] == [1, 2, 4, 8, 16, 32, 48, 48]
    assert bucket(3, 100, smallest=64) == 64 and bucket(3, 40, smallest=64) == 40


def test_the_decode_view_writes_each_slot_at_its_own_column():
    from gspo_engine.model.args import ModelArgs

    args = ModelArgs(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                     num_attention_heads=2, num_key_value_heads=1, head_dim=4, max_position_embeddings=16)
    cache = KVCache.allocate(args, slots=3, capacity=5, dtype=torch.float64, device=torch.device("cpu"))
    cache.lengths.copy_(torch.tensor([2, 0, 4]))
    view = cache.decode(rows=3, columns=4)
    mask = view.attention_mask(None, 1)
    expected = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(mask[:, 0, 0], expected)
    k = torch.arange(3, dtype=torch.float64).view(3, 1, 1, 1).expand(3, 1, 1, 4) + 1
    keys, _ = view.layers[0].update(k, k)
    assert keys.shape == (3, 1, 4, 4)
    written = cache.keys[0][:, 0, :, 0]
    assert written[0, 2] == 1 and written[1, 0] == 2 and written[2, 4] == 3
    assert int((written != 0).sum()) == 3
    view.advance(1)
    # The last column is the most a slot reaches: a finished slot decoding on stays inside the cache.
    assert cache.lengths.tolist() == [3, 1, 4]


def test_a_budget_below_one_sequence_is_refused(model):
    with pytest.raises(ValueError, match="kv_cache_gb = 1e-09 holds no sequence"):
        generate(model, make_prompts(), max_new_tokens=MAX_NEW, kv_cache_gb=1e-9)
    with pytest.raises(ValueError, match="kv_cache_gb must be > 0"):
        generate(model, make_prompts(), max_new_tokens=MAX_NEW, kv_cache_gb=0)
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        generate(model, make_prompts(), max_new_tokens=MAX_NEW, cuda_graphs=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_cuda_graph_decoding_matches_eager_and_never_waits_for_the_device(moe, tmp_path, monkeypatch):
    from gspo_engine.decoding.slots import Completions, Sampler, SlotState, admit, decode_step
    from gspo_engine.decoding.sampling import row_keys

    model = load_pretrained(save_hf_model(build_hf_model(moe=moe, norm_topk_prob=True), tmp_path / "hf"),
                            dtype=torch.bfloat16).cuda()
    prompts = make_prompts()
    options = dict(max_new_tokens=MAX_NEW, temperature=0.8, seed=2, eos_token_id=[5, 17],
                   kv_cache_gb=budget_for(model, prompts, 6) / 2, return_routing=moe)  # bf16: 6 slots
    captured = generate(model, prompts, cuda_graphs=True, **options)
    # The eager twin at the sizes the graphs run (rows and columns rounded up), so that the kernels match.
    monkeypatch.setattr(DecodeRunner, "sizes", lambda self, rows, columns: graphs.graph_sizes(
        rows, columns, self.slots, self.capacity))
    eager = generate(model, prompts, cuda_graphs=False, **options)
    assert captured.slots == 6
    assert captured.tokens == eager.tokens and captured.finished == eager.finished
    for a, b in zip(captured.logps, eager.logps):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-2)
    if moe:
        for a, b in zip(captured.routing, eager.routing):
            assert torch.equal(a, b)

    # One eager decode step (what each graph replays) under the sync debug mode that raises on any wait.
    device = torch.device("cuda")
    capacity = max(len(p) for p in prompts) + MAX_NEW - 1
    cache = KVCache.allocate(model.args, 4, capacity, torch.bfloat16, device)
    state = SlotState.allocate(4, len(prompts), device)
    out = Completions.allocate(len(prompts), MAX_NEW, None, device)
    sampler = Sampler(0.8, 0, 1.0, torch.tensor([5], device=device), MAX_NEW,
                      row_keys(0, list(range(len(prompts))), device))
    with torch.no_grad():
        admit(model, cache, state, out, sampler, [0, 1, 2], prompts[:3], [0, 1, 2])
        # The first step at a shape tunes the Triton kernels (timed runs that wait); the graph runner warms up so too.
        decode_step(model, cache, state, out, sampler, rows=4, columns=capacity)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            decode_step(model, cache, state, out, sampler, rows=4, columns=capacity)
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_a_step_that_cannot_be_captured_runs_eagerly_unless_graphs_are_required():
    counter = torch.zeros((), device="cuda")

    def step(rows, columns):
        counter.add_(1)
        if counter.item() < 0:  # reads back to the host: not allowed while capturing
            raise AssertionError

    runner = DecodeRunner(step, slots=4, capacity=64, use_graphs=True)
    for _ in range(3):
        runner(3, 10)
    assert not runner.use_graphs and runner.captured == 0 and counter.item() == 3
    strict = DecodeRunner(step, slots=4, capacity=64, use_graphs=True, required=True)
    with pytest.raises(RuntimeError):
        strict(3, 10)


def test_routed_experts_is_moe_experts_without_the_range_check():
    import gspo_kernels as gk

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(7, 8, generator=generator)
    weights, experts = gk.moe_route(torch.randn(7, 5, generator=generator), 2)
    gate_up = torch.randn(5, 12, 8, generator=generator)
    down = torch.randn(5, 8, 6, generator=generator)
    torch.testing.assert_close(gk.routed_experts(x, experts, weights, gate_up, down),
                               gk.moe_experts(x, experts, weights, gate_up, down), rtol=0, atol=0)
    with pytest.raises(ValueError, match="w_down"):
        gk.routed_experts(x, experts, weights, gate_up, down[:, :4])
    with pytest.raises(ValueError, match=r"topk_idx must lie in \[0, E = 5\)"):
        gk.moe_experts(x, experts + 5, weights, gate_up, down)


@pytest.fixture(scope="module")
def rollouts_on_two_ranks(tmp_path_factory):
    """Greedy on the dense model, sampled on the MoE one (every pairing of the two runs in one process in
    test_completions_do_not_depend_on_the_budget): both in one torchrun launch of 2 ranks, each rank drawing
    its share under a budget, beside what one unbounded process draws for every prompt."""
    from test_distributed import run_together

    base = tmp_path_factory.mktemp("rollout_ranks")
    prompts = make_prompts()
    (base / "prompts.json").write_text(json.dumps({"prompts": prompts, "max_new_tokens": MAX_NEW, "seed": 4}))
    commands, singles = {}, {}
    for name, temperature in (("dense", 0.0), ("moe", 0.9)):
        checkpoint = save_hf_model(build_hf_model(**MODELS[name]), base / name)
        model = load_pretrained(checkpoint)
        free_run = generate(model, prompts, max_new_tokens=MAX_NEW, temperature=temperature, seed=4,
                            sample_ids=list(range(len(prompts))))
        eos = an_eos_mid_way(free_run.tokens)
        singles[name] = generate(model, prompts, max_new_tokens=MAX_NEW, temperature=temperature, seed=4,
                                 sample_ids=list(range(len(prompts))), eos_token_id=eos)
        commands[name] = {"module": "rollout_ranks",
                          "args": [str(checkpoint), str(base / "prompts.json"), str(base / f"{name}.pt"), temperature, eos]}
    (logs,) = run_together((2, commands, base / "logs"))
    return base, logs, singles


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_two_ranks_under_a_budget_draw_what_one_unbounded_process_draws(rollouts_on_two_ranks, name):
    base, logs, singles = rollouts_on_two_ranks
    assert logs[name].returncode == 0, logs[name].stdout[-3000:] + logs[name].stderr[-3000:]
    shares, single = torch.load(base / f"{name}.pt"), singles[name]
    assert sorted(row for share in shares for row in share["rows"]) == list(range(len(single.tokens)))
    for share in shares:
        for row, tokens, logps in zip(share["rows"], share["tokens"], share["logps"]):
            assert tokens == single.tokens[row]
            torch.testing.assert_close(torch.tensor(logps), single.logps[row], rtol=0, atol=1e-5)


def test_the_one_pass_keyed_sampling_kernel_draws_what_sample_next_draws():
    """gspo_engine/decoding/sampling_triton.py (the CUDA path of keyed draws), here in Triton's interpreter."""
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("needs Triton's interpreter or a GPU")
    from gspo_engine.decoding.sampling import row_keys, sample_next, token_keys
    from gspo_engine.decoding.sampling_triton import keyed_sample

    device = "cuda" if torch.cuda.is_available() else "cpu"
    generator = torch.Generator().manual_seed(0)
    rows, vocab = 24, 4099  # a vocabulary that ends mid-block
    logits = (torch.randn(rows, vocab, generator=generator) * 4).to(device)
    logits[0, 100:] = float("-inf")  # only 100 candidates
    logits[1] = 0.0  # a flat row: the draw is the noise's alone
    logits[2, :3000] = float("-inf")  # whole blocks masked before the first candidate
    keys = token_keys(row_keys(9, list(range(rows)), device), torch.arange(rows, device=device))
    for temperature in (0.6, 1.0, 1.7):
        expected_tokens, expected_logps = sample_next(logits.cpu(), temperature, 0, 1.0, None, keys.cpu())
        tokens, logps = keyed_sample(logits, temperature, keys)
        assert torch.equal(tokens.cpu(), expected_tokens)
        torch.testing.assert_close(logps.cpu(), expected_logps, rtol=0, atol=1e-5)
    assert tokens[0] < 100 and tokens[2] >= 3000 and torch.isfinite(logps).all()


def test_the_keyed_sampling_kernel_compiles_for_every_gpu_architecture():
    """Compiled ahead of time with gspo_kernels.compile_check's compiler call (no GPU needed), in a process
    without TRITON_INTERPRET (the real JIT): it builds for sm_80, sm_90 and sm_100 without spills."""
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton")
    script = """
import torch
from gspo_kernels.compile_check import Specialisation, compile_row
from gspo_engine.decoding.sampling_triton import BLOCK_V, _keyed_sample_kernel
spec = Specialisation(_keyed_sample_kernel, "fp32", dict(
    logits_ptr=torch.float32, keys_ptr=torch.int64, tokens_ptr=torch.int64, logps_ptr=torch.float32,
    V=151936, stride_row=151936, inv_temperature=1.25), dict(BLOCK_V=BLOCK_V))
for arch in (80, 90, 100):
    row = compile_row(spec, arch)
    assert row.ok, row
    print(arch, row.registers, row.spill_bytes)
"""
    root = Path(__file__).resolve().parents[1]
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert [line.split()[0] for line in result.stdout.splitlines()] == ["80", "90", "100"]


def test_keyed_uniforms_hashed_in_int32_are_the_int64_formula():
    from gspo_engine.decoding.sampling import keyed_uniform, mix32, row_keys, token_keys

    keys = token_keys(row_keys(5, list(range(37))), torch.arange(37) * 1000)
    columns = mix32(torch.arange(3001, dtype=torch.long) ^ 0x9E3779B9)
    expected = ((mix32(keys[:, None] ^ columns[None, :]) >> 8).to(torch.float32) + 0.5) * 2.0**-24
    assert torch.equal(keyed_uniform(keys, 3001), expected)
