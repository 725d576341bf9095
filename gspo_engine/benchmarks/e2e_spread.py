"""End to end, the update step on a batch whose completion lengths spread as RL rollouts' do.

Completions of one GSPO batch range from a handful of tokens to thousands; the lengths here are
log-normal, clipped to a range, with the geometric mean of its ends as median and the ends two
standard deviations away. Three ways of running the same update, every one on micro-batches under
the same token budget:

- "packed": gspo_engine's PolicyUpdate with packed micro-batches (gspo.packing, the default): no
  padding in the model, the experts or the fused loss.
- "padded": the same PolicyUpdate on right-padded micro-batches (rows x longest row in the budget).
- "transformers": Qwen3MoeForCausalLM on the padded micro-batches with their attention mask ->
  logits [b, L, V] materialised -> TRL's selective_log_softmax -> the reference sequence-level
  GSPO loss -> backward, the micro-batches weighted by their share of the sequences -> AdamW.
  The baseline of the ratios.

Throughput counts real tokens only (prompt + completion - 1 per sequence), the same work for all.
"""

from __future__ import annotations

import math

import torch

from gspo_engine.batching import Sample, collate, split_micro_batches
from gspo_engine.benchmarks.cases import Case
from gspo_engine.benchmarks.e2e import (
    NARROW_WIDTHS, QWEN3_30B_A3B_WIDTHS, SMOKE_WIDTHS, forward_flops_per_token, model_dict, our_model,
    selective_log_softmax, transformers_model,
)
from gspo_engine.config import GSPOConfig
from gspo_engine.distributed.runtime import Runtime
from gspo_engine.scoring import score_samples
from gspo_engine.step_context import StepContext
from gspo_engine.update import PolicyUpdate
from gspo_kernels import reference

PACKED, PADDED, COMMON = "packed", "padded", "transformers"
# widths, layers, sequences, prompt tokens, (shortest, longest completion), micro-batch tokens.
# 8 layers, not the 4 of the fixed-length cases: with 4 the lm_head outweighs the layers (at the
# 30B-A3B widths 311M head weights against 226M a token passes in 4 layers), while in the released
# 48-layer model the layers are 9 parts in 10; the head's work is on completion tokens only, the
# same packed or padded, so a shallow model understates what padding costs.
SCALES = {
    "gpu": ("30b-a3b-widths", QWEN3_30B_A3B_WIDTHS, 8, 32, 128, (16, 4096), 16384),
    "cpu": ("narrow-widths", NARROW_WIDTHS, 8, 24, 32, (16, 1024), 4096),
    "smoke": ("smoke-widths", SMOKE_WIDTHS, 2, 6, 4, (2, 24), 48),
}


def spread_lengths(count: int, shortest: int, longest: int, seed: int = 0) -> list[int]:
    """`count` log-normal lengths in [shortest, longest]: median sqrt(shortest * longest), the ends at two sigmas."""
    generator = torch.Generator().manual_seed(seed)
    mu = (math.log(shortest) + math.log(longest)) / 2
    sigma = (math.log(longest) - math.log(shortest)) / 4
    draws = torch.randn(count, generator=generator, dtype=torch.float64) * sigma + mu
    return [int(round(min(max(math.exp(x), shortest), longest))) for x in draws.tolist()]


def spread_samples(vocab_size: int, count: int, prompt: int, shortest: int, longest: int) -> list[Sample]:
    generator = torch.Generator().manual_seed(1)
    samples = []
    for length in spread_lengths(count, shortest, longest):
        tokens = torch.randint(0, vocab_size, (prompt + length,), generator=generator).tolist()
        samples.append(Sample(tokens[:prompt], tokens[prompt:], advantage=float(torch.randn(1, generator=generator))))
    return samples


def real_tokens(samples: list[Sample]) -> int:
    return sum(sample.num_positions for sample in samples)


def engine_step(packing: bool, model: dict, samples: list[Sample], budget: int, device: torch.device, dtype):
    """One PolicyUpdate.run (one minibatch: accumulate, clip, AdamW) on packed or padded micro-batches."""
    net = our_model(model, device, dtype)
    # The weights are in the compute dtype already, so no autocast: "fp32" only means none.
    context = StepContext(Runtime(), device, "fp32", pad_id=0, temperature=1.0, micro_batch_tokens=budget,
                          packing=packing)
    score_samples(context, net, samples, "old_logps")
    gspo = GSPOConfig(num_minibatches=1, micro_batch_tokens=budget, packing=packing)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-6, fused=device.type == "cuda" or None)  # as e2e.update_step
    update = PolicyUpdate(context, net, optimizer, gspo, max_grad_norm=1.0, routing_replay=False,
                          max_consecutive_skips=2**31)

    def step():
        update.run(samples)

    return step


def transformers_step(model: dict, samples: list[Sample], budget: int, device: torch.device, dtype):
    net = transformers_model(model, device, dtype)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-6, fused=device.type == "cuda" or None)
    micro_batches = [collate(micro, 0, device) for micro in split_micro_batches(samples, budget)]
    valid = sum(1 for s in samples if s.completion_ids)

    def step():
        for batch in micro_batches:
            logits = net(input_ids=batch.input_ids, attention_mask=batch.real.long(), use_cache=False).logits
            logps = selective_log_softmax(logits, batch.targets)
            loss, _ = reference.gspo_loss_reference(logps, logps.detach(), batch.advantages, batch.mask,
                                                    level="sequence")
            share = int((batch.mask.sum(dim=1) > 0).sum()) / valid
            (loss * share).backward()
            del logits, logps, loss
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def cases(device: torch.device, scale: str) -> list[Case]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    label, widths, layers, count, prompt, (shortest, longest), budget = SCALES[scale]
    model = model_dict(widths, layers)
    samples = spread_samples(model["vocab_size"], count, prompt, shortest, longest)
    tokens = real_tokens(samples)
    flops = sum(3 * forward_flops_per_token(model, s.num_positions / 2) * s.num_positions for s in samples)
    dtype_name = str(dtype).removeprefix("torch.")
    name = (f"update spread B={count} prompt={prompt} completion={shortest}-{longest} log-normal "
            f"budget={budget} {label} {layers} layers {dtype_name}")
    builders = {
        COMMON: lambda: transformers_step(model, samples, budget, device, dtype),
        PADDED: lambda: engine_step(False, model, samples, budget, device, dtype),
        PACKED: lambda: engine_step(True, model, samples, budget, device, dtype),
    }
    return [Case(kernel="e2e", name=name, unit="tokens/s", work=tokens, flops=flops, max_rounds=3, baseline=COMMON,
                 builders=builders)]
