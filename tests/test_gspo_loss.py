"""gspo_loss against an independent float64 implementation of GSPO, on every backend."""

import math

import pytest
import torch

import gspo_kernels as gk
from gspo_kernels import reference

BACKENDS = ["triton", "torch", "reference"]
# The Triton backend runs on the GPU when there is one, else in Triton's interpreter on the CPU.
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LEVELS = ["sequence", "sequence_token", "token"]
EPS_PAIRS = [(3e-4, 4e-4), (0.2, 0.28)]


def independent_gspo(
    logps, old_logps, advantages, mask, level="sequence", eps_low=3e-4, eps_high=4e-4, ref_logps=None, beta=0.0,
    kl_weighted_by_ratio=False, count_empty_sequences=False,
):
    """GSPO written one sequence at a time from the paper's equations (float64, autograd).

    kl_weighted_by_ratio: each token's KL times the ratio of the level (TRL's use_bias_correction_kl);
    count_empty_sequences: the mean divides by every sequence (TRL's loss_type="grpo").
    """
    per_sequence, clipped_low, clipped_high, ratios, kls, tokens = [], 0, 0, [], [], 0
    for i in range(logps.shape[0]):
        positions = mask[i].nonzero().flatten()
        n = positions.numel()
        if n == 0:
            continue
        tokens += n
        logp, old = logps[i, positions], old_logps[i, positions]
        adv = advantages[i].expand(n) if advantages.dim() == 1 else advantages[i, positions]
        if level == "sequence":
            ratio = torch.exp(torch.clamp((logp - old).mean(), max=10.0)).expand(n)
        elif level == "sequence_token":
            seq_log_ratio = (logp - old).mean().detach()
            ratio = torch.exp(torch.clamp(seq_log_ratio + logp - logp.detach(), max=10.0))
        else:
            ratio = torch.exp(torch.clamp(logp - old, max=10.0))
        token_terms = -torch.min(ratio * adv, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv)
        term = token_terms.mean()
        if ref_logps is not None:
            d = torch.clamp(ref_logps[i, positions] - logp, max=20.0)
            token_kl = torch.exp(d) - d - 1
            term = term + beta * (token_kl * ratio if kl_weighted_by_ratio else token_kl).mean()
            kls.append(token_kl.detach().sum())
        per_sequence.append(term)
        r = ratio.detach()
        clipped_low += int(((adv < 0) & (r < 1 - eps_low)).sum())
        clipped_high += int(((adv > 0) & (r > 1 + eps_high)).sum())
        ratios.append(r if level == "token" else r[:1])
    if not per_sequence:
        return logps[mask.bool()].sum() * 0, dict(clip_frac=0.0, clip_frac_low=0.0, clip_frac_high=0.0, ratio_mean=0.0, kl=0.0)
    loss = torch.stack(per_sequence).sum() / (logps.shape[0] if count_empty_sequences else len(per_sequence))
    metrics = dict(
        clip_frac=(clipped_low + clipped_high) / tokens,
        clip_frac_low=clipped_low / tokens,
        clip_frac_high=clipped_high / tokens,
        ratio_mean=float(torch.cat(ratios).mean()),
        kl=float(sum(kls) / tokens) if kls else 0.0,
    )
    return loss, metrics


def make_inputs(seed, batch=6, length=37, log_ratio_scale=0.01, token_advantages=False, with_ref=True):
    """Random inputs whose per-token and per-sequence log-ratios both spread over `log_ratio_scale`."""
    gen = torch.Generator().manual_seed(seed)
    logps = -torch.rand(batch, length, generator=gen, dtype=torch.float64) * 3
    token_noise = torch.randn(batch, length, generator=gen, dtype=torch.float64)
    sequence_shift = torch.randn(batch, 1, generator=gen, dtype=torch.float64)
    old_logps = logps + (token_noise + sequence_shift) * log_ratio_scale
    shape = (batch, length) if token_advantages else (batch,)
    advantages = torch.randn(*shape, generator=gen, dtype=torch.float64)
    mask = torch.rand(batch, length, generator=gen) < 0.7
    mask[0, :] = False  # an empty row
    mask[-1, 1:] = False  # a single response token
    # Garbage under the mask must never reach the result.
    logps[~mask] = float("nan")
    old_logps[~mask] = float("inf")
    ref_logps = logps + torch.randn(batch, length, generator=gen, dtype=torch.float64) * 0.3 if with_ref else None
    if ref_logps is not None:
        ref_logps[~mask] = float("-inf")
    return logps, old_logps, advantages, mask, ref_logps


def run(backend, logps, old_logps, advantages, mask, dtype=torch.float32, **kwargs):
    """Loss, metrics and d loss / d logps (as float64) through one backend."""
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    leaf = cast(logps).requires_grad_()
    ref = kwargs.pop("ref_logps", None)
    with gk.use_backend(backend):
        loss, metrics = gk.gspo_loss(leaf, cast(old_logps), cast(advantages), mask.to(device), ref_logps=cast(ref), **kwargs)
    (grad,) = torch.autograd.grad(loss, leaf)
    return loss.detach().double().cpu(), {k: float(v) for k, v in metrics.items()}, grad.double().cpu()


def expected(logps, old_logps, advantages, mask, **kwargs):
    leaf = logps.clone().requires_grad_()
    loss, metrics = independent_gspo(leaf, old_logps, advantages, mask, **kwargs)
    (grad,) = torch.autograd.grad(loss, leaf, allow_unused=True)
    grad = torch.zeros_like(logps) if grad is None else torch.where(mask, grad, torch.zeros_like(grad))
    return loss.detach(), metrics, grad


def assert_close(actual, want, rel):
    assert torch.isfinite(actual).all()
    error = (actual - want).norm() / want.norm().clamp(min=1e-12)
    assert error < rel, f"relative error {error:.3e}"


def check(backend, inputs, dtype=torch.float32, rel=1e-5, **kwargs):
    logps, old_logps, advantages, mask, ref_logps = inputs
    want_loss, want_metrics, want_grad = expected(logps, old_logps, advantages, mask, ref_logps=ref_logps, **kwargs)
    loss, metrics, grad = run(backend, logps, old_logps, advantages, mask, dtype=dtype, ref_logps=ref_logps, **kwargs)
    assert math.isfinite(float(loss))
    assert abs(float(loss) - float(want_loss)) <= rel * max(1.0, abs(float(want_loss)))
    assert_close(grad, want_grad, rel)
    assert torch.equal(grad[~mask], torch.zeros_like(grad[~mask]))
    for name, value in want_metrics.items():
        assert metrics[name] == pytest.approx(float(value), rel=max(rel, 1e-6), abs=1e-6), name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("eps_low, eps_high", EPS_PAIRS)
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_independent_float64(backend, level, eps_low, eps_high, seed):
    # A log-ratio spread of 1.5 eps puts some sequences and tokens inside the clip range, some outside.
    inputs = make_inputs(seed, batch=9, log_ratio_scale=1.5 * eps_high)
    check(backend, inputs, level=level, eps_low=eps_low, eps_high=eps_high, beta=0.04 * seed)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("level", ["sequence_token", "token"])
def test_per_token_advantages(backend, level):
    inputs = make_inputs(3, token_advantages=True, log_ratio_scale=0.003)
    check(backend, inputs, level=level, beta=0.1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_inputs_stay_float64(backend):
    logps, old_logps, advantages, mask, ref_logps = make_inputs(4)
    leaf = logps.clone().requires_grad_()
    with gk.use_backend(backend):
        loss, _ = gk.gspo_loss(leaf, old_logps, advantages, mask, ref_logps=ref_logps, beta=0.1)
    loss.backward()
    assert loss.dtype == torch.float64 and leaf.grad.dtype == torch.float64


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_many_tiles_and_awkward_lengths(backend, monkeypatch):
    from gspo_kernels import loss_triton

    monkeypatch.setattr(loss_triton, "FORWARD_BLOCK_T", 16)
    monkeypatch.setattr(loss_triton, "BACKWARD_BLOCK_T", 16)
    for length, level in [(1, "sequence"), (16, "token"), (53, "sequence_token"), (100, "sequence")]:
        inputs = make_inputs(length, batch=3, length=length, token_advantages=level != "sequence")
        check(backend, inputs, level=level, eps_low=0.2, eps_high=0.28, beta=0.05)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("level", LEVELS)
def test_extreme_log_ratios_stay_finite(backend, level):
    logps, old_logps, advantages, mask, ref_logps = make_inputs(5, batch=4, log_ratio_scale=0.0)
    shift = torch.tensor([0.0, 60.0, -60.0, 11.0], dtype=torch.float64)[:, None]
    old_logps = old_logps - shift  # mean log-ratios of 0, +60, -60 and +11 per sequence
    advantages = torch.tensor([0.5, -1.0, 1.0, -2.0], dtype=torch.float64)
    ref_logps = logps + 40.0  # KL log-ratio past its clamp
    check(backend, (logps, old_logps, advantages, mask, ref_logps), level=level, beta=0.01)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("level", LEVELS)
def test_all_masked_batch_gives_zero(backend, level):
    logps, old_logps, advantages, mask, ref_logps = make_inputs(6)
    mask = torch.zeros_like(mask)
    loss, metrics, grad = run(backend, logps, old_logps, advantages, mask, level=level, ref_logps=ref_logps, beta=0.1)
    assert float(loss) == 0.0
    assert torch.equal(grad, torch.zeros_like(grad))
    assert all(value == 0.0 for value in metrics.values())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 5), (3, 0)])
def test_empty_tensors(backend, shape):
    logps = torch.zeros(shape)
    loss, _, grad = run(backend, logps, logps, torch.zeros(shape[0]), torch.ones(shape, dtype=torch.bool))
    assert float(loss) == 0.0 and grad.shape == shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_sequence_token_equals_sequence_with_sequence_advantages(backend):
    logps, old_logps, advantages, mask, ref_logps = make_inputs(7, log_ratio_scale=0.002)
    broadcast = advantages[:, None].expand_as(logps).contiguous()
    seq = run(backend, logps, old_logps, advantages, mask, level="sequence")
    for adv in (advantages, broadcast):
        tok = run(backend, logps, old_logps, adv, mask, level="sequence_token")
        assert float(tok[0]) == pytest.approx(float(seq[0]), rel=1e-6, abs=1e-7)
        assert_close(tok[2], seq[2], 1e-6)
        assert tok[1] == pytest.approx(seq[1], rel=1e-6, abs=1e-7)


# TRL's conventions, each alone and both together, against the independent float64 GSPO.
TRL_CONVENTIONS = [
    dict(kl_weighted_by_ratio=True),
    dict(count_empty_sequences=True),
    dict(kl_weighted_by_ratio=True, count_empty_sequences=True),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("convention", TRL_CONVENTIONS, ids=lambda c: "+".join(c))
@pytest.mark.parametrize("seed", [20, 21])
def test_trl_conventions_match_independent_float64(backend, level, convention, seed):
    # Ratios well away from 1 (log-ratio spread 0.3), so that weighting the KL by them matters.
    inputs = make_inputs(seed, batch=7, log_ratio_scale=0.3, token_advantages=level != "sequence" and seed % 2 == 1)
    check(backend, inputs, level=level, eps_low=0.2, eps_high=0.28, beta=0.3, **convention)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("level", LEVELS)
def test_kl_weighted_by_ratio_changes_the_loss_and_its_gradient(backend, level):
    logps, old_logps, advantages, mask, ref_logps = make_inputs(22, log_ratio_scale=0.3)
    options = dict(level=level, eps_low=0.2, eps_high=0.28, ref_logps=ref_logps, beta=0.3)
    plain = run(backend, logps, old_logps, advantages, mask, **options)
    weighted = run(backend, logps, old_logps, advantages, mask, kl_weighted_by_ratio=True, **options)
    assert abs(float(weighted[0]) - float(plain[0])) > 1e-3
    assert (weighted[2] - plain[2]).norm() > 1e-3 * plain[2].norm()
    assert weighted[1]["kl"] == pytest.approx(plain[1]["kl"], rel=1e-6)  # the metric stays the plain k3 mean


@pytest.mark.parametrize("backend", BACKENDS)
def test_count_empty_sequences_divides_by_the_batch(backend):
    logps, old_logps, advantages, mask, ref_logps = make_inputs(23)
    assert (mask.sum(dim=1) == 0).sum() == 1
    options = dict(ref_logps=ref_logps, beta=0.1)
    valid = run(backend, logps, old_logps, advantages, mask, **options)
    every = run(backend, logps, old_logps, advantages, mask, count_empty_sequences=True, **options)
    batch = mask.shape[0]
    assert float(every[0]) == pytest.approx(float(valid[0]) * (batch - 1) / batch, rel=1e-6)
    assert_close(every[2], valid[2] * (batch - 1) / batch, 1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("level", LEVELS)
def test_kl_weighted_by_ratio_with_extreme_log_ratios(backend, level):
    logps, old_logps, advantages, mask, ref_logps = make_inputs(24, batch=4, log_ratio_scale=0.0)
    old_logps = old_logps - torch.tensor([0.0, 60.0, -60.0, 11.0], dtype=torch.float64)[:, None]
    ref_logps = logps + torch.tensor([0.5, 40.0, 0.3, -2.0], dtype=torch.float64)[:, None]
    check(backend, (logps, old_logps, advantages, mask, ref_logps), level=level, beta=0.01,
          kl_weighted_by_ratio=True, count_empty_sequences=True)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_trl_conventions_over_many_tiles(backend, monkeypatch):
    from gspo_kernels import loss_triton

    monkeypatch.setattr(loss_triton, "FORWARD_BLOCK_T", 16)
    monkeypatch.setattr(loss_triton, "BACKWARD_BLOCK_T", 16)
    for length, level in [(16, "token"), (53, "sequence_token"), (100, "sequence")]:
        inputs = make_inputs(length, batch=3, length=length, log_ratio_scale=0.2, token_advantages=level == "token")
        check(backend, inputs, level=level, eps_low=0.2, eps_high=0.28, beta=0.2, kl_weighted_by_ratio=True,
              count_empty_sequences=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_count_empty_sequences_with_an_all_masked_batch_gives_zero(backend):
    logps, old_logps, advantages, mask, ref_logps = make_inputs(25)
    mask = torch.zeros_like(mask)
    loss, _, grad = run(backend, logps, old_logps, advantages, mask, ref_logps=ref_logps, beta=0.1,
                        kl_weighted_by_ratio=True, count_empty_sequences=True)
    assert float(loss) == 0.0 and torch.equal(grad, torch.zeros_like(grad))


def test_gradient_is_the_paper_equation_10():
    # Unclipped sequences: d loss / d logp_it = -(1/G) s_i A_i / |y_i| for every response token.
    logps, old_logps, advantages, mask, _ = make_inputs(8, log_ratio_scale=0.0)
    _, _, grad = run("torch", logps, old_logps, advantages, mask, dtype=torch.float64, eps_low=0.2, eps_high=0.2)
    lengths = mask.sum(dim=1)
    valid = (lengths > 0).sum()
    want = -advantages[:, None] / lengths.clamp(min=1)[:, None] / valid * mask
    assert_close(grad, want, 1e-12)


def test_sequence_loss_is_a_mean_over_sequences_not_tokens():
    logps = torch.zeros(2, 4)
    mask = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 1]])
    loss, _ = gk.gspo_loss(logps, logps, torch.tensor([1.0, 3.0]), mask)
    assert float(loss) == pytest.approx(-(1.0 + 3.0) / 2)


# The loss kernels have no tl.dot, so their bf16 loads are checked in the interpreter too.
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("level", LEVELS)
def test_bfloat16(backend, level):
    inputs = make_inputs(9, token_advantages=level != "sequence", log_ratio_scale=0.05)
    logps, old_logps, advantages, mask, ref_logps = inputs
    # The bf16 rounding of the inputs is part of the problem; compare against float64 on the rounded values.
    rounded = tuple(None if t is None else t.to(torch.bfloat16).double() for t in (logps, old_logps, advantages, ref_logps))
    check(backend, (rounded[0], rounded[1], rounded[2], mask, rounded[3]), dtype=torch.bfloat16, rel=1e-2,
          level=level, eps_low=0.2, eps_high=0.28, beta=0.1)


def test_bfloat16_gradient_keeps_the_input_dtype():
    logps = torch.randn(3, 9).to(torch.bfloat16).requires_grad_()
    loss, _ = gk.gspo_loss(logps, logps.detach(), torch.randn(3), torch.ones(3, 9))
    loss.backward()
    assert loss.dtype == torch.float32 and logps.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("kl_weighted_by_ratio", [False, True])
def test_triton_writes_every_output_element(level, kl_weighted_by_ratio, monkeypatch):
    from gspo_kernels import loss_triton

    def poisoned(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(loss_triton, "allocate_output", poisoned)
    logps, old_logps, advantages, mask, ref_logps = make_inputs(10, token_advantages=level != "sequence")
    args = [t.float().to(TRITON_DEVICE) for t in (logps, old_logps, advantages)]
    mask, ref_logps = mask.to(TRITON_DEVICE), ref_logps.float().to(TRITON_DEVICE)
    stats = loss_triton.forward_stats(*args, mask, ref_logps, level, 0.2, 0.28, 0.1, kl_weighted_by_ratio)
    assert torch.isfinite(stats).all()
    for count_empty_sequences in (False, True):
        loss, metrics, num_averaged = loss_triton.reduce_stats(stats, level, count_empty_sequences)
        assert torch.isfinite(loss) and torch.isfinite(metrics).all() and torch.isfinite(num_averaged)
    grad_loss = torch.tensor(1.0, device=TRITON_DEVICE)
    grad = loss_triton.backward_grad(*args, mask, ref_logps, stats, level, 0.2, 0.28, 0.1, kl_weighted_by_ratio,
                                     grad_loss, num_averaged)
    assert torch.isfinite(grad).all()


def test_masks_of_any_numeric_type():
    logps, old_logps, advantages, mask, _ = make_inputs(11)
    want = run("torch", logps, old_logps, advantages, mask)
    for typed_mask in (mask.int(), mask.float(), mask.to(torch.uint8)):
        got = run("torch", logps, old_logps, advantages, typed_mask)
        assert float(got[0]) == float(want[0])


def test_reference_module_is_the_reference_backend():
    logps, old_logps, advantages, mask, ref_logps = make_inputs(12)
    kwargs = dict(level="token", ref_logps=ref_logps, beta=0.2)
    loss, _ = reference.gspo_loss_reference(logps, old_logps, advantages, mask, **kwargs)
    with gk.use_backend("reference"):
        same, _ = gk.gspo_loss(logps, old_logps, advantages, mask, **kwargs)
    assert float(loss) == float(same)


class TestBadInput:
    def setup_method(self):
        self.logps = torch.randn(2, 5)
        self.adv = torch.randn(2)
        self.mask = torch.ones(2, 5)

    @pytest.mark.parametrize(
        "kwargs, message",
        [
            (dict(old_logps=torch.randn(2, 4)), "old_logps must have the shape of logps"),
            (dict(mask=torch.ones(5, 2)), "mask must have the shape of logps"),
            (dict(advantages=torch.randn(3)), "advantages must be \\[B\\] or \\[B, T\\]"),
            (dict(advantages=torch.randn(2, 5)), "level 'sequence' takes one advantage per sequence"),
            (dict(level="tokens"), "level must be one of"),
            (dict(eps_low=-0.1), "eps_low must be a finite number >= 0"),
            (dict(eps_high=float("nan")), "eps_high must be a finite number >= 0"),
            (dict(beta=0.1), "beta = 0.1 needs ref_logps"),
            (dict(beta=-1.0, ref_logps=torch.randn(2, 5)), "beta must be a finite number >= 0"),
            (dict(ref_logps=torch.randn(2, 6)), "ref_logps must have the shape of logps"),
            (dict(logps=torch.randint(0, 3, (2, 5))), "logps must be a floating-point tensor"),
            (dict(logps=torch.randn(2, 5, 1)), "logps must be \\[B, T\\]"),
            (dict(old_logps=[[0.0] * 5] * 2), "old_logps must be a torch.Tensor"),
            (dict(kl_weighted_by_ratio=1), "kl_weighted_by_ratio must be True or False"),
            (dict(count_empty_sequences="yes"), "count_empty_sequences must be True or False"),
        ],
    )
    def test_raises_value_error(self, kwargs, message):
        args = dict(logps=self.logps, old_logps=self.logps, advantages=self.adv, mask=self.mask)
        options = {}
        for key, value in kwargs.items():
            (args if key in args else options)[key] = value
        with pytest.raises(ValueError, match=message):
            gk.gspo_loss(args["logps"], args["old_logps"], args["advantages"], args["mask"], **options)

    def test_message_names_the_shapes(self):
        with pytest.raises(ValueError, match=r"\(2, 4\).*\(2, 5\)"):
            gk.gspo_loss(self.logps, torch.randn(2, 4), self.adv, self.mask)


def test_forcing_triton_on_cpu_tensors_without_the_interpreter_says_what_to_do(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    logps = torch.zeros(2, 3)
    with gk.use_backend("triton"), pytest.raises(ValueError, match="runs CUDA tensors.*TRITON_INTERPRET=1"):
        gk.gspo_loss(logps, logps, torch.zeros(2), torch.ones(2, 3))


def test_backward_fills_no_zero_gradients_for_the_metrics():
    """Each zero tensor autograd would materialise for the five metrics is one more kernel launch on a GPU."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountFills(TorchDispatchMode):
        fills = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.fill_, torch.ops.aten.zero_, torch.ops.aten.zeros):
                CountFills.fills += 1
            return func(*args, **(kwargs or {}))

    logps, old_logps, advantages, mask, _ = make_inputs(13)
    logps.requires_grad_()
    loss, _ = gk.gspo_loss(logps, old_logps, advantages, mask)
    with CountFills():
        loss.backward()
    # the PyTorch path's own 0-dim zero (aten.zeros, then its fill); none for the metrics
    assert CountFills.fills <= 2 and logps.grad is not None
