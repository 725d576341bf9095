"""The gated delta rule and the short causal convolution against plain float64 references and transformers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gspo_engine.model.gated_delta_rule import (
    chunk_gated_delta_rule,
    gated_delta_rule,
    recurrent_gated_delta_rule,
)
from gspo_engine.model.short_conv import causal_conv1d


def reference_delta_rule(q, k, v, g, beta, scale, lengths, initial_states=None, qk_l2norm=False):
    """The equations token by token, one sequence at a time, in float64.

    q, k [T, H, K], v [T, HV, V], g, beta [T, HV] of one packed row cut by `lengths`; returns the
    output [T, HV, V] and the final state [N, HV, K, V] of each sequence.
    """
    q, k, v, g, beta = (x.double() for x in (q, k, v, g, beta))
    if qk_l2norm:
        q = q / torch.sqrt((q * q).sum(-1, keepdim=True) + 1e-6)
        k = k / torch.sqrt((k * k).sum(-1, keepdim=True) + 1e-6)
    heads, v_heads = k.shape[1], v.shape[1]
    outputs, finals = [], []
    start = 0
    for index, length in enumerate(lengths):
        states = []
        for hv in range(v_heads):
            h = hv // (v_heads // heads)
            if initial_states is None:
                state = torch.zeros(k.shape[-1], v.shape[-1], dtype=torch.float64)
            else:
                state = initial_states[index, hv].double()
            for t in range(start, start + length):
                decayed = torch.exp(g[t, hv]) * state
                u = beta[t, hv] * (v[t, hv] - decayed.T @ k[t, h])
                state = decayed + torch.outer(k[t, h], u)
                outputs.append((t, hv, scale * state.T @ q[t, h]))
            states.append(state)
        finals.append(torch.stack(states))
        start += length
    out = torch.zeros(q.shape[0], v_heads, v.shape[-1], dtype=torch.float64)
    for t, hv, value in outputs:
        out[t, hv] = value
    return out, torch.stack(finals)


def random_inputs(seq, heads, v_heads, k_dim, v_dim, dtype=torch.float64, generator=None, requires_grad=False):
    """Inputs as the layers make them: l2-normalised q, k; beta in (0, 1); g = -exp(A) * softplus(a + dt)."""
    def rand(*shape):
        return torch.randn(*shape, generator=generator, dtype=dtype)

    q = F.normalize(rand(1, seq, heads, k_dim), dim=-1)
    k = F.normalize(rand(1, seq, heads, k_dim), dim=-1)
    v = rand(1, seq, v_heads, v_dim)
    beta = torch.sigmoid(rand(1, seq, v_heads))
    g = -torch.exp(rand(v_heads) * 0.5) * F.softplus(rand(1, seq, v_heads))
    tensors = [q, k, v, g, beta]
    if requires_grad:
        tensors = [t.detach().requires_grad_() for t in tensors]
    return tensors


def cumulative(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


@pytest.mark.parametrize("chunk_size", [1, 5, 16, 64])
@pytest.mark.parametrize("heads,v_heads", [(2, 2), (1, 3)])
def test_chunked_rule_matches_the_recurrence_on_ragged_packed_rows(chunk_size, heads, v_heads):
    generator = torch.Generator().manual_seed(chunk_size * 10 + v_heads)
    lengths = [7, 1, 0, 23, 6]
    q, k, v, g, beta = random_inputs(sum(lengths), heads, v_heads, 4, 3, generator=generator)
    initial = torch.randn(len(lengths), v_heads, 4, 3, generator=generator, dtype=torch.float64)
    out, final = chunk_gated_delta_rule(
        q, k, v, g, beta, scale=0.7, initial_state=initial, output_final_state=True,
        cu_seqlens=cumulative(lengths), chunk_size=chunk_size,
    )
    expected_out, expected_final = reference_delta_rule(q[0], k[0], v[0], g[0], beta[0], 0.7, lengths, initial)
    torch.testing.assert_close(out[0], expected_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(final, expected_final, rtol=1e-10, atol=1e-10)


def test_batched_rows_without_cu_seqlens_and_with_l2norm():
    generator = torch.Generator().manual_seed(1)
    q, k, v, g, beta = random_inputs(2 * 19, 2, 4, 5, 3, generator=generator)
    q, k, v, g, beta = (x.reshape(2, 19, *x.shape[2:]) * (3 if x is q else 1) for x in (q, k, v, g, beta))
    out, final = chunk_gated_delta_rule(q, k, v, g, beta, output_final_state=True, qk_l2norm=True, chunk_size=8)
    for row in range(2):
        expected, expected_final = reference_delta_rule(
            q[row], k[row], v[row], g[row], beta[row], 5**-0.5, [19], qk_l2norm=True
        )
        torch.testing.assert_close(out[row], expected, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(final[row], expected_final[0], rtol=1e-10, atol=1e-10)


def test_recurrent_rule_matches_the_reference_and_continues_a_state():
    generator = torch.Generator().manual_seed(2)
    lengths = [9, 4]
    q, k, v, g, beta = random_inputs(13, 2, 2, 4, 4, generator=generator)
    out, final = recurrent_gated_delta_rule(
        q, k, v, g, beta, output_final_state=True, cu_seqlens=cumulative(lengths)
    )
    expected_out, expected_final = reference_delta_rule(q[0], k[0], v[0], g[0], beta[0], 0.5, lengths)
    torch.testing.assert_close(out[0], expected_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(final, expected_final, rtol=1e-10, atol=1e-10)
    # Prefill 8 tokens chunked, then one decode step: the same as 9 tokens at once.
    first = [x[:, :8] for x in (q, k, v, g, beta)]
    _, state = chunk_gated_delta_rule(*first, output_final_state=True, chunk_size=3)
    step_out, _ = recurrent_gated_delta_rule(*[x[:, 8:9] for x in (q, k, v, g, beta)], initial_state=state)
    torch.testing.assert_close(step_out[0, 0], expected_out[8], rtol=1e-10, atol=1e-10)


def test_chunked_rule_gradients_match_the_reference():
    generator = torch.Generator().manual_seed(3)
    lengths = [11, 2, 17]
    inputs = random_inputs(sum(lengths), 2, 4, 3, 5, generator=generator, requires_grad=True)
    initial = torch.randn(3, 4, 3, 5, generator=generator, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(sum(lengths), 4, 5, generator=generator, dtype=torch.float64)
    state_weights = torch.randn(3, 4, 3, 5, generator=generator, dtype=torch.float64)

    def loss_of(out, final):
        return (out.reshape(weights.shape) * weights).sum() + (final * state_weights).sum()

    out, final = chunk_gated_delta_rule(
        *inputs, initial_state=initial, output_final_state=True, cu_seqlens=cumulative(lengths), chunk_size=4
    )
    grads = torch.autograd.grad(loss_of(out, final), [*inputs, initial])
    expected = reference_delta_rule(*(x[0] for x in inputs), 3**-0.5, lengths, initial)
    expected_grads = torch.autograd.grad(loss_of(*expected), [*inputs, initial])
    for name, got, want in zip(["q", "k", "v", "g", "beta", "initial_state"], grads, expected_grads):
        assert torch.isfinite(got).all(), name
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10, msg=name)


def test_chunked_rule_fp32_and_its_gradients_on_strong_decays():
    """Chunks of 64 with decays down to exp(-60) per chunk: nothing overflows, fp32 stays close to fp64."""
    generator = torch.Generator().manual_seed(4)
    inputs64 = random_inputs(150, 2, 2, 8, 8, generator=generator)
    inputs64[3] = inputs64[3] * 3
    inputs32 = [x.float().requires_grad_() for x in inputs64]
    inputs64 = [x.requires_grad_() for x in inputs64]
    out32, _ = chunk_gated_delta_rule(*inputs32, qk_l2norm=True)
    out64, _ = chunk_gated_delta_rule(*inputs64, qk_l2norm=True)
    assert out32.dtype == torch.float32
    assert (out32.double() - out64).norm() / out64.norm() < 1e-5
    weights = torch.randn(out64.shape, generator=generator, dtype=torch.float64)
    grads32 = torch.autograd.grad((out32 * weights.float()).sum(), inputs32)
    grads64 = torch.autograd.grad((out64 * weights).sum(), inputs64)
    for got, want in zip(grads32, grads64):
        assert torch.isfinite(got).all()
        assert (got.double() - want).norm() / want.norm() < 1e-4


def test_chunked_rule_equals_transformers_torch_fallbacks():
    from transformers.models.qwen3_next.modeling_qwen3_next import (
        torch_chunk_gated_delta_rule,
        torch_recurrent_gated_delta_rule,
    )

    generator = torch.Generator().manual_seed(5)
    q, k, v, g, beta = (x.float().reshape(2, 35, *x.shape[2:]) for x in random_inputs(70, 2, 4, 8, 6, generator=generator))
    q, k = q * 2, k * 2
    initial = torch.randn(2, 4, 8, 6, generator=generator)
    ours, our_state = gated_delta_rule(
        q, k, v, g, beta, initial_state=initial, output_final_state=True, qk_l2norm=True
    )
    theirs, their_state = torch_chunk_gated_delta_rule(
        q, k, v, g=g, beta=beta, initial_state=initial, output_final_state=True, use_qk_l2norm_in_kernel=True
    )
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(our_state, their_state, rtol=1e-4, atol=1e-5)
    step = [x[:, :1] for x in (q, k, v, g, beta)]
    ours, our_state = recurrent_gated_delta_rule(*step, initial_state=initial, output_final_state=True, qk_l2norm=True)
    theirs, their_state = torch_recurrent_gated_delta_rule(
        *step[:3], g=step[3], beta=step[4], initial_state=initial, output_final_state=True, use_qk_l2norm_in_kernel=True
    )
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(our_state, their_state, rtol=1e-5, atol=1e-6)


def test_bf16_inputs_compute_in_fp32():
    generator = torch.Generator().manual_seed(6)
    inputs = random_inputs(20, 1, 1, 4, 4, generator=generator)
    out_bf16, state = chunk_gated_delta_rule(*(x.bfloat16() for x in inputs), output_final_state=True)
    out64, _ = chunk_gated_delta_rule(*inputs)
    assert out_bf16.dtype == torch.bfloat16 and state.dtype == torch.float32
    assert (out_bf16.double() - out64).norm() / out64.norm() < 2e-2


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: {**a, "k": a["k"][:, :3]}, "q and k"),
        (lambda a: {**a, "v": a["v"][:, :, :1].expand(1, 5, 3, 4)}, "multiple of the key heads"),
        (lambda a: {**a, "beta": a["beta"][..., :1]}, "beta must be"),
        (lambda a: {**a, "cu_seqlens": torch.tensor([0, 3, 4])}, "rise from 0 to T = 5"),
        (lambda a: {**a, "cu_seqlens": torch.tensor([0, 5]), "initial_state": torch.zeros(2, 2, 4, 4)}, "initial_state"),
    ],
)
def test_bad_arguments_name_what_is_wrong(change, message):
    q, k, v, g, beta = random_inputs(5, 2, 2, 4, 4)
    arguments = change(dict(q=q, k=k, v=v, g=g, beta=beta))
    with pytest.raises(ValueError, match=message):
        chunk_gated_delta_rule(**arguments)


def reference_conv(x, weight, lengths):
    """y_t = silu(sum_w weight[:, w] x_{t - W + 1 + w}) per sequence, zeros before its start, in float64."""
    x, weight = x.double(), weight.double()
    width = weight.shape[1]
    out = torch.zeros_like(x)
    start = 0
    for length in lengths:
        for t in range(start, start + length):
            total = torch.zeros(x.shape[-1], dtype=torch.float64)
            for w in range(width):
                source = t - (width - 1) + w
                if source >= start:
                    total = total + weight[:, w] * x[source]
            out[t] = F.silu(total)
        start += length
    return out


def test_conv_resets_at_sequence_starts_and_keeps_final_states():
    generator = torch.Generator().manual_seed(7)
    lengths = [5, 1, 0, 9, 2]
    x = torch.randn(1, sum(lengths), 6, generator=generator, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(6, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    y, final = causal_conv1d(x, weight, output_final_state=True, cu_seqlens=cumulative(lengths))
    expected = reference_conv(x[0], weight, lengths)
    torch.testing.assert_close(y[0], expected, rtol=1e-12, atol=1e-12)
    bounds = cumulative(lengths).tolist()
    for index, (start, end) in enumerate(zip(bounds, bounds[1:])):
        history = torch.cat((torch.zeros(3, 6, dtype=torch.float64), x[0, start:end].detach()))[-3:]
        torch.testing.assert_close(final[index], history.T)
    weights = torch.randn(y.shape, generator=generator, dtype=torch.float64)
    grads = torch.autograd.grad((y * weights).sum(), [x, weight])
    expected_grads = torch.autograd.grad((expected * weights[0]).sum(), [x, weight])
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_conv_continues_from_its_state_like_one_call():
    generator = torch.Generator().manual_seed(8)
    x = torch.randn(3, 11, 5, generator=generator)
    weight = torch.randn(5, 4, generator=generator)
    whole, whole_state = causal_conv1d(x, weight, output_final_state=True)
    first, state = causal_conv1d(x[:, :2], weight, output_final_state=True)
    pieces = [first]
    for t in range(2, 11):
        y, state = causal_conv1d(x[:, t : t + 1], weight, initial_state=state, output_final_state=True)
        pieces.append(y)
    torch.testing.assert_close(torch.cat(pieces, dim=1), whole)
    torch.testing.assert_close(state, whole_state)


def test_conv_equals_transformers_fallbacks():
    from transformers.models.qwen3_next.modeling_qwen3_next import causal_conv1d_fn, causal_conv1d_update

    generator = torch.Generator().manual_seed(9)
    x = torch.randn(2, 13, 7, generator=generator)
    weight = torch.randn(7, 4, generator=generator)
    ours, state = causal_conv1d(x, weight, output_final_state=True)
    theirs = causal_conv1d_fn(x.transpose(1, 2), weight, None, activation="silu").transpose(1, 2)
    torch.testing.assert_close(ours, theirs)
    step = torch.randn(2, 1, 7, generator=generator)
    # transformers' decode state keeps the last W inputs, ours the last W - 1 (all the next step reads).
    their_state = torch.cat((x[:, -4:-3].transpose(1, 2), state), dim=-1).clone()
    theirs = causal_conv1d_update(step.transpose(1, 2), their_state, weight, None, "silu").transpose(1, 2)
    ours, next_state = causal_conv1d(step, weight, initial_state=state, output_final_state=True)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(next_state, their_state[..., 1:])


def test_the_cuda_backend_without_fla_core_names_the_extra():
    import importlib.util

    from gspo_engine.model.fla_backend import MissingFlashLinearAttention

    if importlib.util.find_spec("fla") is not None:
        pytest.skip("fla-core is installed here")
    q, k, v, g, beta = random_inputs(5, 1, 1, 4, 4)
    with pytest.raises(MissingFlashLinearAttention, match=r"gspo-engine\[next\]"):
        gated_delta_rule(q, k, v, g, beta, backend="fla")
    with pytest.raises(MissingFlashLinearAttention, match="fla-core"):
        causal_conv1d(v[0].float(), torch.randn(4, 4), backend="fla")
