"""Our GSPO loss against the installed TRL's own GRPOTrainer loss, on the same inputs.

TRL computes its loss in `GRPOTrainer._compute_loss(model, inputs)`: per-token log-probs from the
model, then the clipped importance-weighted term, the KL and the mean over sequences. The tests
call that method on a trainer object holding only the attributes it reads, with the model's
log-probs replaced by a tensor of ours, so TRL's arithmetic runs unchanged. Settings:
`loss_type="grpo"` with `importance_sampling_level="sequence"` (GSPO) or `"token"` (GRPO), beta 0
and > 0, `use_bias_correction_kl` True (TRL's default) and False; the batch holds a sequence
without completion tokens, as `mask_truncated_completions` leaves a truncated one.
"""

import contextlib
import copy
import re
import types
from collections import defaultdict
from pathlib import Path

import pytest
import torch

import gspo_kernels as gk

pytest.importorskip("trl")
from trl import GRPOConfig, GRPOTrainer  # noqa: E402
from trl.trainer.utils import selective_log_softmax  # noqa: E402

# The Triton backend runs on the GPU when there is one, else in Triton's interpreter on the CPU.
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRL_LEVELS = {"sequence": "sequence", "token": "token"}  # our level -> TRL's importance_sampling_level
BATCH, STEPS, PROMPT = 6, 23, 4
EMPTY_ROW = 2
# transformers' TrainingArguments, which GRPOConfig extends, warns about a renamed field on every construction.
pytestmark = pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning")


def trl_config(tmp_path, level, beta, use_bias_correction_kl, epsilon, epsilon_high):
    return GRPOConfig(
        output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False,
        loss_type="grpo", importance_sampling_level=TRL_LEVELS[level], beta=beta,
        use_bias_correction_kl=use_bias_correction_kl, epsilon=epsilon, epsilon_high=epsilon_high,
    )


def trl_trainer(args):
    """A GRPOTrainer holding only what `_compute_loss` reads, set from `args` as its __init__ sets it."""
    trainer = GRPOTrainer.__new__(GRPOTrainer)
    identity = lambda tensor, **_: tensor  # noqa: E731  (one process: gather and reduce return their input)
    trainer.__dict__.update(
        args=args,
        loss_type=args.loss_type,
        importance_sampling_level=args.importance_sampling_level,
        beta=args.beta,
        epsilon_low=args.epsilon,
        epsilon_high=args.epsilon_high if args.epsilon_high is not None else args.epsilon,
        top_entropy_quantile=args.top_entropy_quantile,
        off_policy_mask_threshold=args.off_policy_mask_threshold,
        use_vllm=args.use_vllm,
        vllm_importance_sampling_correction=args.vllm_importance_sampling_correction,
        _entropy_bonus_enabled=args.entropy_coef != 0.0 or args.use_adaptive_entropy,
        aux_loss_enabled=False,
        model=types.SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1,
        accelerator=types.SimpleNamespace(gather=identity, reduce=identity, gather_for_metrics=identity,
                                          unwrap_model=identity, autocast=contextlib.nullcontext,
                                          is_main_process=True),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
    )
    return trainer


def trl_loss(trainer, logps, old_logps, advantages, mask, ref_logps):
    """TRL's loss of `logps` [B, T] (the model's per-token log-probs) and its logged metrics."""
    trainer._get_per_token_logps_and_entropies = lambda *args, **kwargs: (logps, torch.zeros_like(logps), None)
    inputs = {
        "prompt_ids": torch.ones(BATCH, PROMPT, dtype=torch.long),
        "prompt_mask": torch.ones(BATCH, PROMPT, dtype=torch.long),
        "completion_ids": torch.ones(mask.shape, dtype=torch.long),
        "completion_mask": mask,
        "advantages": advantages,
        "old_per_token_logps": old_logps,
    }
    if trainer.beta != 0.0:
        inputs["ref_per_token_logps"] = ref_logps
    return trainer._compute_loss(None, inputs), trainer._metrics["train"]


def make_rollout(seed):
    """float64 log-probs [B, T] and old / ref log-probs, advantages [B], a mask with an empty and a full row."""
    gen = torch.Generator().manual_seed(seed)
    logps = -torch.rand(BATCH, STEPS, generator=gen, dtype=torch.float64) * 3
    sequence_shift = 0.15 * torch.randn(BATCH, 1, generator=gen, dtype=torch.float64)
    old_logps = logps + sequence_shift + 0.1 * torch.randn(BATCH, STEPS, generator=gen, dtype=torch.float64)
    ref_logps = logps + 0.4 * torch.randn(BATCH, STEPS, generator=gen, dtype=torch.float64)
    advantages = torch.randn(BATCH, generator=gen, dtype=torch.float64)
    mask = (torch.rand(BATCH, STEPS, generator=gen) < 0.7).long()
    mask[EMPTY_ROW] = 0  # no completion tokens: a truncated completion under mask_truncated_completions
    mask[0] = 1
    mask[-1, 3:] = 0  # right padding
    return logps, old_logps, advantages, mask, ref_logps


def assert_close(actual, expected, rel, name="gradient"):
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert torch.isfinite(actual).all(), name
    error = float((actual - expected).norm() / expected.norm().clamp(min=1e-30))
    assert error < rel, f"{name}: relative error {error:.2e}"


CASES = [
    pytest.param(level, beta, bias_correction, id=f"{level}-beta{beta}-bias_correction_{bias_correction}")
    for level in TRL_LEVELS
    for beta, bias_correction in [(0.0, True), (0.2, True), (0.2, False)]
]
# TRL's default clip range (0.2 both sides) and the GSPO paper's.
EPSILONS = [pytest.param(0.2, None, id="trl_default_eps"), pytest.param(3e-4, 4e-4, id="gspo_eps")]


@pytest.mark.parametrize("level, beta, bias_correction", CASES)
@pytest.mark.parametrize("epsilon, epsilon_high", EPSILONS)
@pytest.mark.parametrize("backend", ["torch", "triton", "reference"])
def test_gspo_loss_matches_trl_loss(tmp_path, level, beta, bias_correction, epsilon, epsilon_high, backend):
    args = trl_config(tmp_path, level, beta, bias_correction, epsilon, epsilon_high)
    logps, old_logps, advantages, mask, ref_logps = make_rollout(seed=1 if level == "sequence" else 2)

    trl_leaf = logps.clone().requires_grad_()
    expected, trl_metrics = trl_loss(trl_trainer(args), trl_leaf, old_logps, advantages, mask, ref_logps)
    (expected_grad,) = torch.autograd.grad(expected, trl_leaf)

    # fp64 on the PyTorch path and the reference; the Triton kernels take fp32.
    dtype = torch.float32 if backend == "triton" else torch.float64
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    cast = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    leaf = cast(logps).requires_grad_()
    with gk.use_backend(backend):
        loss, metrics = gk.gspo_loss(
            leaf, cast(old_logps), cast(advantages), mask.to(device), level=level,
            eps_low=args.epsilon, eps_high=args.epsilon_high or args.epsilon,
            ref_logps=cast(ref_logps), beta=args.beta,
            kl_weighted_by_ratio=args.use_bias_correction_kl, count_empty_sequences=True,
        )
    (grad,) = torch.autograd.grad(loss, leaf)

    rel = 1e-5 if dtype == torch.float32 else 1e-12
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=rel, abs=rel)
    assert_close(grad, expected_grad, rel)
    if beta != 0.0 and not bias_correction:
        # TRL logs the mean per-token k3 KL; with the bias correction it logs the ratio-weighted one.
        assert float(metrics["kl"]) == pytest.approx(trl_metrics["kl"][-1], rel=max(rel, 1e-7))


@pytest.mark.parametrize("level, beta, bias_correction", CASES)
def test_default_conventions_differ_from_trl_where_documented(tmp_path, level, beta, bias_correction):
    """Without the options our loss leaves the empty sequence out of the mean and the KL unweighted."""
    args = trl_config(tmp_path, level, beta, bias_correction, 0.2, None)
    logps, old_logps, advantages, mask, ref_logps = make_rollout(seed=3)
    expected, _ = trl_loss(trl_trainer(args), logps, old_logps, advantages, mask, ref_logps)
    options = dict(level=level, eps_low=0.2, eps_high=0.2, ref_logps=ref_logps, beta=beta)
    ours, _ = gk.gspo_loss(logps, old_logps, advantages, mask, **options)
    num_valid = int((mask.sum(dim=1) > 0).sum())
    assert float(ours) != pytest.approx(float(expected), rel=1e-6)
    if beta == 0.0 or not bias_correction:
        assert float(ours) * num_valid / BATCH == pytest.approx(float(expected), rel=1e-12)


@pytest.mark.parametrize("level, beta, bias_correction", CASES)
def test_linear_gspo_loss_matches_trl_loss_through_the_lm_head(tmp_path, level, beta, bias_correction):
    """LinearGSPOLoss as TRL would call it, against TRL's loss of TRL's log-probs: gradients to hidden, weight, bias."""
    vocab, hidden_size, temperature = 97, 16, 0.9
    args = trl_config(tmp_path, level, beta, bias_correction, 0.2, 0.28)
    _, old_logps, advantages, mask, ref_logps = make_rollout(seed=4)
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(BATCH, STEPS, hidden_size, generator=gen, dtype=torch.float64)
    weight = 0.5 * torch.randn(vocab, hidden_size, generator=gen, dtype=torch.float64)
    bias = 0.3 * torch.randn(vocab, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, vocab, (BATCH, STEPS), generator=gen)
    with torch.no_grad():  # old and ref log-probs near the current ones, as in training
        logps = selective_log_softmax((hidden @ weight.T + bias) / temperature, targets)
    old_logps, ref_logps = logps + (old_logps + 1.5) * 0.1, logps + (ref_logps + 1.5) * 0.5

    trl_inputs = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    trl_logps = selective_log_softmax((trl_inputs[0] @ trl_inputs[1].T + trl_inputs[2]) / temperature, targets)
    expected, _ = trl_loss(trl_trainer(args), trl_logps, old_logps, advantages, mask, ref_logps)
    expected_grads = torch.autograd.grad(expected, trl_inputs)

    loss_fn = gk.LinearGSPOLoss(
        level=level, eps_low=args.epsilon, eps_high=args.epsilon_high, beta=args.beta, temperature=temperature,
        kl_weighted_by_ratio=args.use_bias_correction_kl, count_empty_sequences=True,
    )
    inputs = [t.float().requires_grad_() for t in (hidden, weight, bias)]
    loss, _ = loss_fn(inputs[0], inputs[1], targets, mask, advantages.float(), bias=inputs[2],
                      ref_per_token_logps=ref_logps.float(), old_per_token_logps=old_logps.float())
    grads = torch.autograd.grad(loss, inputs)

    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-5, abs=1e-6)
    for name, grad, expected_grad in zip(("hidden", "weight", "bias"), grads, expected_grads):
        assert_close(grad, expected_grad, 1e-4, name)
    assert (grads[0][EMPTY_ROW] == 0).all()


def test_trl_defaults_are_the_ones_documented(tmp_path):
    """docs/fused_linear.md maps TRL's defaults to our options; fail loudly when a TRL release changes them."""
    args = GRPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False)
    assert args.use_bias_correction_kl is True
    assert (args.epsilon, args.epsilon_high, args.delta) == (0.2, None, None)
    assert (args.beta, args.temperature) == (0.0, 1.0)
    assert args.mask_truncated_completions is False
    assert (args.top_entropy_quantile, args.off_policy_mask_threshold, args.entropy_coef) == (1.0, None, 0.0)
    assert (args.loss_type, args.importance_sampling_level) == ("dapo", "token")  # GSPO needs both changed


def documented_trainer():
    """The definitions of docs/fused_linear.md's GRPOTrainer override, run as the page shows them."""
    text = (Path(__file__).parent.parent / "docs" / "fused_linear.md").read_text()
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "class GSPOTrainer" in b]
    namespace = {}
    exec(block, namespace)
    return namespace["GSPOTrainer"], namespace["linear_gspo_loss_for"]


@pytest.mark.parametrize("level, beta, bias_correction", CASES)
def test_documented_trainer_override_matches_trl_compute_loss(tmp_path, level, beta, bias_correction):
    """The page's `_compute_loss` on a tiny Qwen3 against TRL's own: loss and every parameter's gradient."""
    from transformers import Qwen3Config, Qwen3ForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    gspo_trainer, linear_gspo_loss_for = documented_trainer()
    args = trl_config(tmp_path, level, beta, bias_correction, 0.2, 0.28)
    args.temperature = 0.8
    torch.manual_seed(6)
    vocab = 97
    config = Qwen3Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=False)
    model = Qwen3ForCausalLM(config).train()
    trl_model = copy.deepcopy(model)
    add_fused_lm_head(trl_model, temperature=args.temperature, cast_lm_head_to_fp32=args.cast_lm_head_to_fp32,
                      outputs=("log_probs", "entropy"))

    _, _, advantages, mask, _ = make_rollout(seed=7)
    prompt_mask = torch.ones(BATCH, PROMPT, dtype=torch.long)
    prompt_mask[1, :2] = 0  # prompts are left-padded
    inputs = {
        "prompt_ids": torch.randint(0, vocab, (BATCH, PROMPT)), "prompt_mask": prompt_mask,
        "completion_ids": torch.randint(0, vocab, (BATCH, STEPS)), "completion_mask": mask,
        "advantages": advantages.float(),
    }
    trainer = trl_trainer(args)
    trainer.model, trainer.temperature = trl_model, args.temperature
    trainer.current_gradient_accumulation_steps = 2
    with torch.no_grad():
        logps, _, _ = trainer._get_per_token_logps_and_entropies(
            trl_model, torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1),
            torch.cat([prompt_mask, mask], dim=1), STEPS,
        )
    gen = torch.Generator().manual_seed(8)
    inputs["old_per_token_logps"] = logps + 0.1 * torch.randn(BATCH, 1, generator=gen)
    inputs["ref_per_token_logps"] = logps + 0.3 * torch.randn(BATCH, STEPS, generator=gen)

    expected = trainer._compute_loss(trl_model, inputs)
    expected_grads = torch.autograd.grad(expected, list(trl_model.parameters()))

    ours = gspo_trainer.__new__(gspo_trainer)
    ours.__dict__.update(trainer.__dict__, model=model, linear_gspo_loss=linear_gspo_loss_for(args))
    loss = ours._compute_loss(model, inputs)
    grads = torch.autograd.grad(loss, list(model.parameters()))

    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-5, abs=1e-6)
    names = [name for name, _ in model.named_parameters()]
    for name, grad, expected_grad in zip(names, grads, expected_grads):
        assert_close(grad, expected_grad, 1e-4, name)
