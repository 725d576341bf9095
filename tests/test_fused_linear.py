"""token_logprobs, fused_linear_gspo_loss and LinearGSPOLoss against float64 full-logits references."""

import pytest
import torch

import gspo_kernels as gk
from gspo_kernels import fused_linear, reference

# CUDA when there is one (the GPU check runs this file there), else CPU with Triton's interpreter.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = ["triton", "torch", "reference"]
# The Triton kernels are epilogues over BLAS logits (no tl.dot), so the interpreter runs them in bf16 too.
BF16_BACKENDS = ["torch", "triton"]
LEVELS = ["sequence", "sequence_token", "token"]
# V not a multiple of any tile, T not a multiple of any row block.
BATCH, STEPS, HIDDEN, VOCAB = 3, 37, 64, 4099
# Room for 35 response tokens' fp32 logits: make_rollout's full row (37 tokens) is recomputed,
# its ragged row (at most 34) kept.
MIXED_BUDGET_MIB = 35 * VOCAB * 4 / 2**20


def rel_err(value, expected):
    value, expected = value.detach().double(), expected.detach().double()
    assert torch.isfinite(value).all(), "non-finite values"
    return float((value - expected).norm() / expected.norm().clamp(min=1e-30))


def make_lm_head(seed, batch=BATCH, steps=STEPS, hidden=HIDDEN, vocab=VOCAB, with_bias=True):
    """float64 hidden [B, T, H], weight [V, H], bias [V], targets [B, T], with logits of O(5)."""
    gen = torch.Generator().manual_seed(seed)
    hidden_states = torch.randn(batch, steps, hidden, generator=gen, dtype=torch.float64)
    weight = torch.randn(vocab, hidden, generator=gen, dtype=torch.float64) * 0.6
    bias = torch.randn(vocab, generator=gen, dtype=torch.float64) * 0.5 if with_bias else None
    targets = torch.randint(0, vocab, (batch, steps), generator=gen)
    return on_device(*fp32_exact(hidden_states, weight, bias), targets)


def on_device(*tensors):
    return [None if t is None else t.to(DEVICE) for t in tensors]


def fp32_exact(*tensors):
    """Round float64 data to fp32 values, so fp32 runs and float64 references see the same inputs."""
    return [None if t is None else t.float().double() for t in tensors]


def make_rollout(seed, logps):
    """old / ref log-probs near logps, advantages [B], a mask with a ragged, an empty and a full row."""
    gen = torch.Generator().manual_seed(seed + 1000)
    logps = logps.cpu()
    batch, steps = logps.shape
    old = logps.detach() + 0.02 * torch.randn(batch, steps, generator=gen, dtype=logps.dtype)
    ref = logps.detach() + 0.5 * torch.randn(batch, steps, generator=gen, dtype=logps.dtype)
    advantages = torch.randn(batch, generator=gen, dtype=logps.dtype)
    mask = (torch.rand(batch, steps, generator=gen) < 0.8).long()
    mask[1] = 0  # a sequence without response tokens
    mask[0, :3] = 0  # prompt-like leading padding
    mask[2] = 1
    return on_device(*fp32_exact(old, ref, advantages), mask)


def leaves(*tensors, dtype=torch.float32):
    return [None if t is None else t.detach().to(dtype).requires_grad_() for t in tensors]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", [0, 1])
def test_token_logprobs_and_entropy_match_float64_reference(backend, seed):
    hidden, weight, bias, targets = make_lm_head(seed)
    temperature = 0.7
    expected_logps, expected_entropy = reference.token_logprobs_reference(
        *leaves(hidden, weight, dtype=torch.float64), targets, bias=bias, temperature=temperature, return_entropy=True
    )
    gen = torch.Generator().manual_seed(seed + 7)
    upstream_logp, upstream_entropy = on_device(
        torch.randn(hidden.shape[:2], generator=gen, dtype=torch.float64),
        torch.randn(hidden.shape[:2], generator=gen, dtype=torch.float64),
    )

    exact = leaves(hidden, weight, bias, dtype=torch.float64)
    ref_logps, ref_entropy = reference.token_logprobs_reference(
        exact[0], exact[1], targets, bias=exact[2], temperature=temperature, return_entropy=True
    )
    ref_grads = torch.autograd.grad((ref_logps * upstream_logp).sum() + (ref_entropy * upstream_entropy).sum(), exact)

    inputs = leaves(hidden, weight, bias)
    with gk.use_backend(backend):
        logps, entropy = gk.token_logprobs(
            inputs[0], inputs[1], targets, bias=inputs[2], temperature=temperature, return_entropy=True
        )
        grads = torch.autograd.grad(
            (logps * upstream_logp.float()).sum() + (entropy * upstream_entropy.float()).sum(), inputs
        )
    assert logps.dtype == torch.float32 and logps.shape == targets.shape
    assert rel_err(logps, expected_logps) < 1e-5
    assert rel_err(entropy, expected_entropy) < 1e-5
    for name, grad, ref_grad in zip(("hidden", "weight", "bias"), grads, ref_grads):
        assert rel_err(grad, ref_grad) < 1e-5, name


def test_token_logprobs_without_entropy_skips_rows_with_zero_gradient():
    hidden, weight, _, targets = make_lm_head(2, with_bias=False)
    exact = leaves(hidden, weight, dtype=torch.float64)
    upstream = (torch.randn(hidden.shape[:2], dtype=torch.float64) * (torch.rand(hidden.shape[:2]) < 0.5)).to(DEVICE)
    ref_grads = torch.autograd.grad((reference.token_logprobs_reference(*exact, targets) * upstream).sum(), exact)
    inputs = leaves(hidden, weight)
    with gk.use_backend("torch"):
        grads = torch.autograd.grad((gk.token_logprobs(*inputs, targets) * upstream.float()).sum(), inputs)
    assert all(rel_err(g, r) < 1e-5 for g, r in zip(grads, ref_grads))
    assert (grads[0][upstream == 0] == 0).all()


def fused_case(seed, level):
    hidden, weight, bias, targets = make_lm_head(seed)
    with torch.no_grad():
        logps = reference.token_logprobs_reference(hidden, weight, targets, bias=bias, temperature=0.7)
    old, ref, advantages, mask = make_rollout(seed, logps)
    if level != "sequence":
        noise = 0.1 * torch.randn(targets.shape, dtype=torch.float64, device=DEVICE)
        advantages = fp32_exact(advantages[:, None] + noise)[0]
    options = {"temperature": 0.7, "level": level, "eps_low": 3e-3, "eps_high": 4e-3, "beta": 0.05}
    return (hidden, weight, bias, targets), (old, advantages, mask, ref), options


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("level", LEVELS)
def test_fused_linear_gspo_loss_matches_float64_reference(backend, level):
    seed = LEVELS.index(level)
    (hidden, weight, bias, targets), (old, advantages, mask, ref), options = fused_case(seed, level)
    exact = leaves(hidden, weight, bias, dtype=torch.float64)
    ref_loss, ref_metrics = reference.fused_linear_gspo_loss_reference(
        exact[0], exact[1], targets, old, advantages, mask, bias=exact[2], ref_logps=ref, **options
    )
    ref_grads = torch.autograd.grad(ref_loss, exact)

    inputs = leaves(hidden, weight, bias)
    with gk.use_backend(backend):
        loss, metrics = gk.fused_linear_gspo_loss(
            inputs[0], inputs[1], targets, old.float(), advantages.float(), mask, bias=inputs[2],
            ref_logps=ref.float(), chunk_budget_mib=MIXED_BUDGET_MIB, **options,
        )
        grads = torch.autograd.grad(loss, inputs)
    assert abs(float(loss) - float(ref_loss)) < 1e-5 * max(1.0, abs(float(ref_loss)))
    assert metrics.keys() == ref_metrics.keys()
    for name in metrics:
        assert abs(float(metrics[name]) - float(ref_metrics[name])) < 1e-5, name
    for name, grad, ref_grad in zip(("hidden", "weight", "bias"), grads, ref_grads):
        assert rel_err(grad, ref_grad) < 2e-5, name
    assert (grads[0][1] == 0).all(), "a sequence without response tokens gets no gradient"
    chunks = fused_linear.chunk_sequences(mask.sum(dim=1).tolist(), VOCAB, 4, MIXED_BUDGET_MIB)
    assert chunks == [([0], True), ([2], False)], "one kept and one recomputed sequence"


TRL_CONVENTIONS = [
    dict(kl_weighted_by_ratio=True),
    dict(count_empty_sequences=True),
    dict(kl_weighted_by_ratio=True, count_empty_sequences=True),
]


def trl_convention_case(seed, level):
    """fused_case with old log-probs a per-sequence shift away, so that weighting the KL by s_i matters."""
    lm_head, (old, advantages, mask, ref), options = fused_case(seed, level)
    gen = torch.Generator().manual_seed(seed + 2000)
    shift = 0.2 * torch.randn(old.shape[0], 1, generator=gen, dtype=torch.float64).to(DEVICE)
    return lm_head, (fp32_exact(old + shift)[0], advantages, mask, ref), {**options, "beta": 0.3}


def budgets_by_backend():
    """(budget, backend) pairs: kept groups never reach the backend's tile kernels, so the Triton
    backend runs where something is recomputed (mixed with the slow tests: 18 s in the interpreter)."""
    pairs = []
    for budget, name in ((0, "recomputed"), (MIXED_BUDGET_MIB, "mixed"), (512, "kept")):
        for backend in BACKENDS:
            if backend == "triton" and name == "kept":
                continue
            marks = pytest.mark.slow if (backend, name) == ("triton", "mixed") else ()
            pairs.append(pytest.param(budget, backend, marks=marks, id=f"{name}-{backend}"))
    return pairs


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("convention", TRL_CONVENTIONS, ids=lambda c: "+".join(c))
@pytest.mark.parametrize("budget_mib, backend", budgets_by_backend())
def test_trl_conventions_match_float64_reference(backend, level, convention, budget_mib):
    (hidden, weight, bias, targets), (old, advantages, mask, ref), options = trl_convention_case(30, level)
    assert (mask.sum(dim=1) == 0).any(), "a sequence without response tokens"
    exact = leaves(hidden, weight, bias, dtype=torch.float64)
    ref_loss, _ = reference.fused_linear_gspo_loss_reference(
        exact[0], exact[1], targets, old, advantages, mask, bias=exact[2], ref_logps=ref, **options, **convention
    )
    ref_grads = torch.autograd.grad(ref_loss, exact)
    default_loss, _ = reference.fused_linear_gspo_loss_reference(
        *(t.detach() for t in exact[:2]), targets, old, advantages, mask, bias=exact[2].detach(), ref_logps=ref,
        **options,
    )
    assert abs(float(ref_loss.detach()) - float(default_loss)) > 1e-3, "the convention changes the loss"
    inputs = leaves(hidden, weight, bias)
    with gk.use_backend(backend):
        loss, _ = gk.fused_linear_gspo_loss(
            inputs[0], inputs[1], targets, old.float(), advantages.float(), mask, bias=inputs[2],
            ref_logps=ref.float(), chunk_budget_mib=budget_mib, **options, **convention,
        )
        grads = torch.autograd.grad(loss, inputs)
    assert abs(float(loss) - float(ref_loss)) < 1e-5 * max(1.0, abs(float(ref_loss)))
    for name, grad, ref_grad in zip(("hidden", "weight", "bias"), grads, ref_grads):
        assert rel_err(grad, ref_grad) < 2e-5, name


def test_linear_gspo_loss_module_takes_trl_conventions():
    (hidden, weight, bias, targets), (old, advantages, mask, ref), options = trl_convention_case(31, "sequence")
    convention = dict(kl_weighted_by_ratio=True, count_empty_sequences=True)
    exact = leaves(hidden, weight, bias, dtype=torch.float64)
    ref_loss, _ = reference.fused_linear_gspo_loss_reference(
        exact[0], exact[1], targets, old, advantages, mask, bias=exact[2], ref_logps=ref, **options, **convention
    )
    ref_grads = torch.autograd.grad(ref_loss, exact)
    module = gk.LinearGSPOLoss(level="sequence", eps_low=options["eps_low"], eps_high=options["eps_high"],
                               beta=options["beta"], temperature=options["temperature"], **convention)
    assert "kl_weighted_by_ratio=True, count_empty_sequences=True" in repr(module)
    inputs = leaves(hidden, weight, bias)
    with gk.use_backend("torch"):
        loss, _ = module(inputs[0], inputs[1], targets, mask, advantages.float(), bias=inputs[2],
                         ref_per_token_logps=ref.float(), old_per_token_logps=old.float())
        grads = torch.autograd.grad(loss, inputs)
        with torch.no_grad():
            no_grad_loss, _ = module(hidden.float(), weight.float(), targets, mask, advantages.float(),
                                     bias=bias.float(), ref_per_token_logps=ref.float(), old_per_token_logps=old.float())
    assert abs(float(loss) - float(ref_loss)) < 1e-5 * max(1.0, abs(float(ref_loss)))
    assert abs(float(no_grad_loss) - float(ref_loss)) < 1e-5 * max(1.0, abs(float(ref_loss)))
    assert all(rel_err(g, r) < 2e-5 for g, r in zip(grads, ref_grads))


@pytest.mark.parametrize("level", LEVELS)
def test_float64_inputs_agree_with_reference_to_rounding(level):
    """In float64 the streamed algorithm must equal the full-logits one up to rounding, not fp32 noise."""
    (hidden, weight, bias, targets), (old, advantages, mask, ref), options = fused_case(20, level)
    results = []
    runs = ((reference.fused_linear_gspo_loss_reference, "reference"), (gk.fused_linear_gspo_loss, "torch"))
    for fn, backend in runs:
        inputs = leaves(hidden, weight, bias, dtype=torch.float64)
        with gk.use_backend(backend):
            loss, _ = fn(inputs[0], inputs[1], targets, old, advantages, mask, bias=inputs[2], ref_logps=ref, **options)
            results.append((loss, torch.autograd.grad(loss, inputs)))
    (ref_loss, ref_grads), (loss, grads) = results
    assert abs(float(loss) - float(ref_loss)) < 1e-12
    assert all(rel_err(g, r) < 1e-10 for g, r in zip(grads, ref_grads))


def test_fused_loss_is_exactly_gspo_loss_of_token_logprobs():
    (hidden, weight, bias, targets), (old, advantages, mask, ref), options = fused_case(3, "sequence")
    hidden, weight, bias, old, advantages, ref = (t.float() for t in (hidden, weight, bias, old, advantages, ref))
    loss_options = {k: v for k, v in options.items() if k != "temperature"}
    with gk.use_backend("torch"):
        logps = gk.token_logprobs(hidden, weight, targets, bias=bias, temperature=0.7)
        chained, chained_metrics = gk.gspo_loss(logps, old, advantages, mask, ref_logps=ref, **loss_options)
        for budget in (0, MIXED_BUDGET_MIB, 512):
            inputs = leaves(hidden, weight, bias)
            loss, metrics = gk.fused_linear_gspo_loss(
                inputs[0], inputs[1], targets, old, advantages, mask, bias=inputs[2], ref_logps=ref,
                chunk_budget_mib=budget, **options,
            )
            assert torch.allclose(loss, chained, rtol=1e-6, atol=1e-7)
            assert all(torch.allclose(metrics[k], chained_metrics[k], rtol=1e-6, atol=1e-7) for k in metrics)


# (3, 5): some thousand tiles of 3 x 5 in the PyTorch loop, 13 s on 2 cores: with the slow tests.
@pytest.mark.parametrize("tile", [pytest.param((3, 5), marks=pytest.mark.slow), (8192, 8192)],
                         ids=["awkward", "gpu-default"])
def test_tile_shape_changes_nothing(monkeypatch, tile):
    from gspo_kernels import fused_linear_stream

    (hidden, weight, bias, targets), (old, advantages, mask, ref), options = fused_case(4, "sequence")
    results = []
    for tiles in ({}, {"cpu": tile}):
        monkeypatch.setitem(fused_linear_stream.STREAM_TILES, "cpu", tiles.get("cpu", (512, 8192)))
        for budget in (0, MIXED_BUDGET_MIB):
            inputs = leaves(hidden, weight, bias)
            with gk.use_backend("torch"):
                loss, _ = gk.fused_linear_gspo_loss(
                    inputs[0], inputs[1], targets, old.float(), advantages.float(), mask, bias=inputs[2],
                    ref_logps=ref.float(), chunk_budget_mib=budget, **options,
                )
                results.append((loss.detach(), *torch.autograd.grad(loss, inputs)))
    # fp32 sums in another order: equal to rounding
    for other in results[1:]:
        assert all(rel_err(g, r) < 2e-5 for g, r in zip(other, results[0]))


def test_devices_default_to_their_measured_strategy():
    assert gk.default_chunk_budget_mib(torch.device("cuda")) == 0  # recompute in cuBLAS tiles on a GPU
    assert gk.default_chunk_budget_mib(torch.device("cpu")) == 512
    assert gk.stream_tile(torch.device("cuda")) == (8192, 8192) and gk.stream_tile(torch.device("cpu")) == (512, 8192)
    (hidden, weight, _, targets), (old, advantages, mask, _), _ = fused_case(1, "sequence")
    with pytest.raises(ValueError, match="chunk_budget_mib must be >= 0"):
        gk.fused_linear_gspo_loss(hidden, weight, targets, old, advantages, mask, chunk_budget_mib=-1)


def test_keep_and_recompute_give_the_same_gradients():
    (hidden, weight, bias, targets), (old, advantages, mask, ref), options = fused_case(4, "sequence")
    results = []
    for budget in (0, MIXED_BUDGET_MIB, 512):  # all recomputed, mixed, all kept
        inputs = leaves(hidden, weight, bias)
        with gk.use_backend("torch"):
            loss, _ = gk.fused_linear_gspo_loss(
                inputs[0], inputs[1], targets, old.float(), advantages.float(), mask, bias=inputs[2],
                ref_logps=ref.float(), chunk_budget_mib=budget, **options,
            )
            results.append(torch.autograd.grad(loss, inputs))
    for other in results[1:]:
        assert all(rel_err(g, r) < 1e-6 for g, r in zip(other, results[0]))


def test_chunk_sequences_keeps_what_fits_and_recomputes_long_sequences():
    # capacity: 10 rows of a 1024-entry fp32 vocabulary in 40 KiB
    lengths = [4, 5, 12, 3, 0, 8, 11]
    chunks = fused_linear.chunk_sequences(lengths, vocab_size=1024, element_bytes=4, budget_mib=40 / 1024)
    assert chunks == [([0, 1], True), ([3], True), ([5], True), ([2, 6], False)]


def test_tied_weights_get_both_gradients():
    """weight shared with the input embedding: its gradient sums the embedding and lm_head paths."""
    _, weight, _, targets = make_lm_head(5, with_bias=False)
    input_ids = torch.randint(0, VOCAB, targets.shape, device=DEVICE)
    old, _, advantages, mask = make_rollout(5, torch.full(targets.shape, -8.0, dtype=torch.float64))

    def run(fn, dtype):
        embedding = weight.detach().to(dtype).requires_grad_()
        hidden = torch.tanh(torch.nn.functional.embedding(input_ids, embedding))
        loss, _ = fn(
            hidden, embedding, targets, old.to(dtype), advantages.to(dtype), mask, temperature=1.3, level="sequence"
        )
        return torch.autograd.grad(loss, embedding)[0]

    expected = run(reference.fused_linear_gspo_loss_reference, torch.float64)
    with gk.use_backend("torch"):
        grad = run(gk.fused_linear_gspo_loss, torch.float32)
    assert rel_err(grad, expected) < 1e-5


def test_all_masked_batch_gives_zero_loss_and_zero_gradients():
    hidden, weight, bias, targets = make_lm_head(6)
    inputs = leaves(hidden, weight, bias)
    mask = torch.zeros(targets.shape, dtype=torch.long, device=DEVICE)
    old = torch.full(targets.shape, float("nan"), device=DEVICE)
    with gk.use_backend("torch"):
        loss, metrics = gk.fused_linear_gspo_loss(
            inputs[0], inputs[1], targets, old, torch.randn(BATCH, device=DEVICE), mask, bias=inputs[2]
        )
        grads = torch.autograd.grad(loss, inputs)
    assert float(loss) == 0.0 and all(torch.isfinite(v) for v in metrics.values())
    assert all((g == 0).all() for g in grads)


def test_no_grad_forward_matches_reference():
    (hidden, weight, bias, targets), (old, advantages, mask, ref), options = fused_case(7, "token")
    expected, _ = reference.fused_linear_gspo_loss_reference(
        hidden, weight, targets, old, advantages, mask, bias=bias, ref_logps=ref, **options
    )
    with torch.no_grad(), gk.use_backend("torch"):
        loss, _ = gk.fused_linear_gspo_loss(
            *(t.float() for t in (hidden, weight)), targets, old.float(), advantages.float(), mask,
            bias=bias.float(), ref_logps=ref.float(), **options,
        )
    assert abs(float(loss) - float(expected)) < 1e-5


@pytest.mark.parametrize("backend", BF16_BACKENDS)
def test_bf16_token_logprobs(backend):
    hidden, weight, _, targets = make_lm_head(8, with_bias=False)
    exact = leaves(hidden.bfloat16(), weight.bfloat16(), dtype=torch.float64)
    expected = reference.token_logprobs_reference(*exact, targets)
    ref_grads = torch.autograd.grad(expected.sum(), exact)
    inputs = leaves(hidden, weight, dtype=torch.bfloat16)
    with gk.use_backend(backend):
        logps = gk.token_logprobs(*inputs, targets)
        grads = torch.autograd.grad(logps.sum(), inputs)
    assert logps.dtype == torch.float32
    assert rel_err(logps, expected) < 1e-2
    assert all(rel_err(g, r) < 1e-2 for g, r in zip(grads, ref_grads))


# One kept group, mixed, one recomputed group. Kept groups never reach the backend's tile kernels, so
# the Triton backend is checked where something is recomputed.
@pytest.mark.parametrize("budget_mib, backend", [(512, "torch"), (MIXED_BUDGET_MIB, "torch"), (1e-3, "torch"),
                                                 (MIXED_BUDGET_MIB, "triton"), (1e-3, "triton")])
def test_bf16_fused_loss_is_as_accurate_as_bf16_full_logits(budget_mib, backend):
    """GSPO gradients come from differences of log-probs, which bf16 logits perturb by ~1e-2: the
    fused path must do no worse than the full-logits reference run in the same dtype."""
    (hidden, weight, _, targets), (old, advantages, mask, ref), options = fused_case(14, "sequence")
    exact = leaves(hidden.bfloat16(), weight.bfloat16(), dtype=torch.float64)
    ref_loss, _ = reference.fused_linear_gspo_loss_reference(
        *exact, targets, old, advantages, mask, ref_logps=ref, **options
    )
    ref_grads = torch.autograd.grad(ref_loss, exact)
    errors = {}
    for name in (backend, "reference"):
        inputs = leaves(hidden, weight, dtype=torch.bfloat16)
        with gk.use_backend(name):
            loss, _ = gk.fused_linear_gspo_loss(
                *inputs, targets, old.float(), advantages.float(), mask, ref_logps=ref.float(),
                chunk_budget_mib=budget_mib, **options,
            )
            grads = torch.autograd.grad(loss, inputs)
        assert all(g.dtype == torch.bfloat16 for g in grads)
        errors[name] = [abs(float(loss) - float(ref_loss))] + [rel_err(g, r) for g, r in zip(grads, ref_grads)]
    assert errors[backend][0] < 1e-2 * max(1.0, abs(float(ref_loss)))
    assert all(ours <= theirs for ours, theirs in zip(errors[backend][1:], errors["reference"][1:]))


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_single_token(backend):
    hidden, weight, bias, targets = make_lm_head(15, batch=1, steps=1)
    exact = leaves(hidden, weight, bias, dtype=torch.float64)
    expected = reference.token_logprobs_reference(exact[0], exact[1], targets, bias=exact[2])
    ref_grads = torch.autograd.grad(expected.sum(), exact)
    inputs = leaves(hidden, weight, bias)
    with gk.use_backend(backend):
        logps = gk.token_logprobs(inputs[0], inputs[1], targets, bias=inputs[2])
        grads = torch.autograd.grad(logps.sum(), inputs)
    assert rel_err(logps, expected) < 1e-6
    assert all(rel_err(g, r) < 1e-5 for g, r in zip(grads, ref_grads))


def test_extreme_log_ratios_match_the_clamped_reference():
    """old log-probs 50 nats away: the ratio's exp is clamped, values stay finite, gradients match."""
    (hidden, weight, bias, targets), (old, advantages, mask, ref), options = fused_case(16, "token")
    old = old.clone()
    old[0] -= 50.0  # ratios of e^50 before the clamp
    old[2] += 50.0  # ratios of e^-50
    exact = leaves(hidden, weight, bias, dtype=torch.float64)
    ref_loss, _ = reference.fused_linear_gspo_loss_reference(exact[0], exact[1], targets, old, advantages, mask,
                                                             bias=exact[2], ref_logps=ref, **options)
    ref_grads = torch.autograd.grad(ref_loss, exact)
    inputs = leaves(hidden, weight, bias)
    with gk.use_backend("torch"):
        loss, _ = gk.fused_linear_gspo_loss(inputs[0], inputs[1], targets, old.float(), advantages.float(), mask,
                                            bias=inputs[2], ref_logps=ref.float(), **options)
        grads = torch.autograd.grad(loss, inputs)
    assert abs(float(loss) - float(ref_loss)) < 1e-5 * max(1.0, abs(float(ref_loss)))
    assert all(rel_err(g, r) < 2e-5 for g, r in zip(grads, ref_grads))


def test_large_logits_stay_finite():
    hidden, weight, _, targets = make_lm_head(9, with_bias=False)
    weight = weight * 40  # logits of O(300): exp overflows without the running max
    exact = leaves(hidden, weight, dtype=torch.float64)
    expected = reference.token_logprobs_reference(*exact, targets, temperature=0.5)
    ref_grads = torch.autograd.grad(expected.sum(), exact)
    for backend in ("torch", "triton"):
        inputs = leaves(hidden, weight)
        with gk.use_backend(backend):
            logps = gk.token_logprobs(*inputs, targets, temperature=0.5)
            grads = torch.autograd.grad(logps.sum(), inputs)
        assert rel_err(logps, expected) < 1e-5
        assert all(rel_err(g, r) < 1e-4 for g, r in zip(grads, ref_grads))


def test_linear_gspo_loss_module_on_policy():
    (hidden, weight, _, targets), (_, advantages, mask, ref), _ = fused_case(10, "sequence")
    exact = leaves(hidden, weight, dtype=torch.float64)
    logps = reference.token_logprobs_reference(*exact, targets, temperature=0.9)
    ref_loss, ref_metrics = reference.gspo_loss_reference(
        logps, logps.detach(), advantages, mask, ref_logps=ref, beta=0.1
    )
    ref_grads = torch.autograd.grad(ref_loss, exact)
    module = gk.LinearGSPOLoss(level="sequence", beta=0.1, temperature=0.9)
    inputs = leaves(hidden, weight)
    with gk.use_backend("torch"):
        loss, metrics = module(inputs[0], inputs[1], targets, mask, advantages.float(), ref_per_token_logps=ref.float())
        grads = torch.autograd.grad(loss, inputs)
    assert abs(float(loss) - float(ref_loss)) < 1e-5
    # Liger's layout, which TRL indexes: [kl, clip_frac] when beta != 0
    assert len(metrics) == 2 and float(metrics[-1]) == 0.0
    assert float(metrics[0]) == pytest.approx(float(ref_metrics["kl"]), rel=1e-5)
    assert all(rel_err(g, r) < 1e-5 for g, r in zip(grads, ref_grads))


def test_matches_liger_sequence_level_grpo_loss():
    liger = pytest.importorskip("liger_kernel.chunked_loss")
    hidden, weight, bias, targets = make_lm_head(11)
    with torch.no_grad():
        logps = reference.token_logprobs_reference(hidden, weight, targets, bias=bias)
    old, _, advantages, mask = make_rollout(11, logps)
    mask[1, :5] = 1  # Liger averages over every sequence, this project over non-empty ones
    liger_loss_fn = liger.LigerFusedLinearGRPOLoss(
        beta=0.0, compiled=False, use_ref_model=False, epsilon_low=3e-3, epsilon_high=4e-3,
        loss_type="grpo", importance_sampling_level="sequence",
    )
    ours_fn = gk.LinearGSPOLoss(level="sequence", eps_low=3e-3, eps_high=4e-3)
    results = []
    for fn in (liger_loss_fn, ours_fn):
        inputs = leaves(hidden, weight, bias)
        with gk.use_backend("torch"):
            loss, metrics = fn(inputs[0], inputs[1], targets, mask, advantages.float(), bias=inputs[2],
                               old_per_token_logps=old.float())
        results.append((loss, metrics, torch.autograd.grad(loss, inputs)))
    (liger_loss, liger_metrics, liger_grads), (loss, metrics, grads) = results
    assert abs(float(loss) - float(liger_loss)) < 1e-5
    assert len(metrics) == len(liger_metrics) == 1
    assert float(metrics[-1]) == pytest.approx(float(liger_metrics[-1]), abs=1e-6)  # clipped fraction
    assert all(rel_err(g, r) < 1e-4 for g, r in zip(grads, liger_grads))


@pytest.mark.parametrize("use_bias_correction_kl", [False, True])
def test_matches_liger_with_its_conventions(use_bias_correction_kl):
    """Liger's "grpo" with a KL and an empty sequence: count_empty_sequences and kl_weighted_by_ratio reproduce it."""
    liger = pytest.importorskip("liger_kernel.chunked_loss")
    hidden, weight, bias, targets = make_lm_head(17)
    with torch.no_grad():
        logps = reference.token_logprobs_reference(hidden, weight, targets, bias=bias)
    old, ref, advantages, mask = make_rollout(17, logps)
    old = old + 0.1 * torch.randn(old.shape[0], 1, generator=torch.Generator().manual_seed(17), dtype=old.dtype)
    assert (mask.sum(dim=1) == 0).any()
    options = dict(epsilon_low=0.2, epsilon_high=0.28, loss_type="grpo", importance_sampling_level="sequence")
    liger_loss_fn = liger.LigerFusedLinearGRPOLoss(beta=0.2, compiled=False, use_ref_model=True,
                                                   use_bias_correction_kl=use_bias_correction_kl, **options)
    ours_fn = gk.LinearGSPOLoss(level="sequence", eps_low=0.2, eps_high=0.28, beta=0.2,
                                kl_weighted_by_ratio=use_bias_correction_kl, count_empty_sequences=True)
    results = []
    for fn in (liger_loss_fn, ours_fn):
        inputs = leaves(hidden, weight, bias)
        with gk.use_backend("torch"):
            loss, _ = fn(inputs[0], inputs[1], targets, mask, advantages.float(), bias=inputs[2],
                         ref_per_token_logps=ref.float(), old_per_token_logps=old.float())
        results.append((loss.detach(), torch.autograd.grad(loss, inputs)))
    (liger_loss, liger_grads), (loss, grads) = results
    assert abs(float(loss) - float(liger_loss)) < 1e-5
    assert all(rel_err(g, r) < 1e-4 for g, r in zip(grads, liger_grads))


# 5 x 5 tiles: 7 s in the interpreter, with the slow tests.
MANY_TILES = pytest.param(True, False, (16, 1000), marks=pytest.mark.slow)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias, with_entropy, tile", [(False, False, None), (True, True, None), MANY_TILES])
def test_triton_epilogues_write_every_element_and_match_the_pytorch_tile(monkeypatch, dtype, with_bias, with_entropy,
                                                                         tile):
    """Statistics and d logits of an awkward tile: 71 rows, vocabulary chunk [1000, 1333) of 4099; the
    statistics also over 5 x 5 tiles of 16 rows x 1000 entries (the last ones partial)."""
    pytest.importorskip("triton")
    from gspo_kernels import fused_linear_stream, fused_linear_triton

    monkeypatch.setattr(fused_linear_triton, "allocate_output",
                        lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device))
    if tile is not None:
        monkeypatch.setitem(fused_linear_stream.STREAM_TILES, DEVICE.type, tile)
    hidden, weight, bias, targets = (t.to(dtype) if t.is_floating_point() else t for t in make_lm_head(12))
    bias = bias if with_bias else None
    rows, flat_targets = hidden.reshape(-1, HIDDEN)[:71], targets.reshape(-1)[:71]
    stats = fused_linear_triton.logprob_stats(rows, weight, bias, flat_targets, 1 / 0.7, with_entropy)
    expected = fused_linear_stream.stream_stats_torch(rows, weight, bias, flat_targets, 1 / 0.7, with_entropy)
    for value, wanted in zip(stats, expected):
        assert (value is None) == (wanted is None)
        if value is not None:
            assert value.dtype == torch.float32 and rel_err(value, wanted) < 1e-5
    grad_logp, grad_entropy = on_device(torch.randn(71), torch.randn(71) if with_entropy else None)
    dlogits = fused_linear_triton.dlogits_tile(rows, weight, bias, 1000, 1333, flat_targets, expected[1], expected[2],
                                               grad_logp, grad_entropy, 1 / 0.7)
    wanted = fused_linear_stream.dlogits_tile_torch(rows, weight, bias, 1000, 1333, flat_targets, expected[1],
                                                    expected[2], grad_logp, grad_entropy, 1 / 0.7)
    assert dlogits.shape == (71, 333) and dlogits.dtype == dtype and torch.isfinite(dlogits).all()
    # the targets inside the chunk carry +g_logp: the one-hot term landed
    assert ((flat_targets >= 1000) & (flat_targets < 1333)).any()
    assert rel_err(dlogits, wanted) < (1e-6 if dtype == torch.float32 else 1e-2)


def replace_column(targets, token_id):
    """targets with column 3 set to token_id."""
    return targets.clone().index_fill_(1, torch.tensor([3], device=targets.device), token_id)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"targets": lambda t: replace_column(t, VOCAB)}, r"targets must lie in \[0, 4099\)"),
        ({"targets": lambda t: replace_column(t, -1)}, r"targets must lie in \[0, 4099\)"),
        ({"targets": lambda t: t.float()}, "targets must hold integer"),
        ({"targets": lambda t: t[:, :5]}, r"targets must be \[B, T\]"),
        ({"hidden": lambda h: h[0]}, r"hidden must be \[B, T, H\]"),
        ({"weight": lambda w: w[:, :10]}, r"weight must be \[V, H\]"),
        ({"bias": lambda b: b[:10]}, r"bias must be \[V\]"),
        ({"temperature": lambda _: 0.0}, "temperature must be a positive"),
    ],
)
def test_invalid_inputs_raise_value_error_naming_the_argument(change, message):
    hidden, weight, bias, targets = make_lm_head(13)
    args = {"hidden": hidden, "weight": weight, "bias": bias, "targets": targets, "temperature": 1.0}
    for name, edit in change.items():
        args[name] = edit(args[name])
    with pytest.raises(ValueError, match=message):
        gk.token_logprobs(
            args["hidden"], args["weight"], args["targets"], bias=args["bias"], temperature=args["temperature"]
        )
    with pytest.raises(ValueError, match=message):
        gk.fused_linear_gspo_loss(
            args["hidden"], args["weight"], args["targets"], None, torch.zeros(BATCH, device=DEVICE),
            torch.ones(targets.shape, device=DEVICE), bias=args["bias"], temperature=args["temperature"],
        )
