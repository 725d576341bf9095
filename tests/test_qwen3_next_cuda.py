"""The CUDA path of the Gated DeltaNet layers (flash-linear-attention) against our PyTorch path and transformers.

Runs where a GPU and fla-core are (bench/gpu_check.sh carries the wheel); skipped elsewhere.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from gspo_engine.model import fla_backend
from gspo_engine.model.gated_delta_rule import gated_delta_rule
from gspo_engine.model.short_conv import causal_conv1d

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(importlib.util.find_spec("fla") is None, reason="needs fla-core (pip install -e '.[next]')"),
]
DEVICE = torch.device("cuda")


def inputs(seq: int, heads: int, v_heads: int, k_dim: int, v_dim: int, dtype: torch.dtype, seed: int):
    generator = torch.Generator(device=DEVICE).manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=generator, device=DEVICE)

    q, k = rand(1, seq, heads, k_dim), rand(1, seq, heads, k_dim)
    v = rand(1, seq, v_heads, v_dim)
    beta = torch.sigmoid(rand(1, seq, v_heads))
    g = -torch.exp(rand(v_heads) * 0.5) * torch.nn.functional.softplus(rand(1, seq, v_heads))
    return [t.to(dtype).requires_grad_() if t is not g else t.requires_grad_() for t in (q, k, v, g, beta)]


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 2e-3), (torch.bfloat16, 2e-2)])
def test_fla_rule_matches_ours_on_packed_rows_with_states(dtype, tolerance):
    lengths = [300, 1, 77, 1000]
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=DEVICE, dtype=torch.int32)
    tensors = inputs(sum(lengths), 4, 8, 128, 128, dtype, seed=0)
    initial = torch.randn(len(lengths), 8, 128, 128, device=DEVICE) * 0.1
    weights = torch.randn(1, sum(lengths), 8, 128, device=DEVICE)
    refusal = fla_backend.gated_backward_refusal()
    results = {}
    for backend in ("fla", "torch", None):
        leaves = [t.detach().clone().requires_grad_() for t in tensors]
        out, final = gated_delta_rule(*leaves, initial_state=initial, output_final_state=True, cu_seqlens=cu_seqlens,
                                      qk_l2norm=True, backend=backend)
        if backend != "fla" or refusal is None:
            ((out.float() * weights).sum() + final.float().sum()).backward()
        results[backend] = (out, final, [leaf.grad for leaf in leaves])
    fla, ours, default = results["fla"], results["torch"], results[None]
    assert fla[0].dtype == dtype and torch.isfinite(fla[0]).all()
    assert relative(fla[0], ours[0]) < tolerance
    assert relative(fla[1], ours[1]) < tolerance
    if refusal is None:
        for name, a, b in zip("q k v g beta".split(), fla[2], ours[2]):
            assert relative(a, b) < 5 * tolerance, name
    else:
        # fla would raise in the backward: a training call routes to our chunked rule, gradients and all.
        for name, a, b in zip("q k v g beta".split(), default[2], ours[2]):
            assert torch.equal(a, b), name
    # Without gradients fla's kernels run whatever its backward would do.
    with torch.no_grad():
        no_grad_out, _ = gated_delta_rule(*tensors, initial_state=initial, cu_seqlens=cu_seqlens, qk_l2norm=True)
    assert torch.equal(no_grad_out, fla[0].detach())


def test_fla_conv_matches_ours_on_packed_rows():
    lengths = [5, 1, 300]
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=DEVICE, dtype=torch.int32)
    x = torch.randn(1, sum(lengths), 512, device=DEVICE, dtype=torch.bfloat16)
    weight = torch.randn(512, 4, device=DEVICE, dtype=torch.bfloat16)
    fla, _ = causal_conv1d(x, weight, cu_seqlens=cu_seqlens, backend="fla")
    ours, _ = causal_conv1d(x, weight, cu_seqlens=cu_seqlens, backend="torch")
    assert relative(fla, ours) < 1e-2


def test_the_tiny_model_on_cuda_matches_transformers_and_generates_its_greedy_tokens(tmp_path):
    from tiny_hybrid_checkpoints import VOCAB, build_hybrid_model, padded_batch, save_hybrid_checkpoint

    from gspo_engine.hf_checkpoint import load_pretrained
    from gspo_engine.rollout import generate

    hf_model = build_hybrid_model("next", seed=3)
    model = load_pretrained(save_hybrid_checkpoint(hf_model, tmp_path), dtype=torch.float32, device=DEVICE)
    hf_model.to(DEVICE)
    input_ids, attention_mask, position_ids = (t.to(DEVICE) for t in padded_batch(seq=150))
    real = attention_mask.bool()
    with torch.no_grad():
        expected = hf_model(input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
        logits = model(input_ids, attention_mask, position_ids)
    assert relative(logits[real], expected[real]) < 2e-3  # fp32 weights; fla's dots run in tf32
    prompts = [torch.randint(0, VOCAB, (n,)).tolist() for n in (4, 90, 17)]
    generation = generate(model, prompts, max_new_tokens=8, temperature=0, cuda_graphs=False)
    for prompt, tokens in zip(prompts, generation.tokens):
        ids = torch.tensor([prompt], device=DEVICE)
        out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                                eos_token_id=None, pad_token_id=VOCAB)
        assert tokens == out[0, len(prompt):].tolist()
    # Decode steps replayed as CUDA graphs carry the conv and recurrent states in place like eager ones.
    graphed = generate(model, prompts, max_new_tokens=8, temperature=0, cuda_graphs=True)
    assert graphed.tokens == generation.tokens
