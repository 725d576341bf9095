"""gspo_engine.generate: prefill and decode tokens/s of a randomly initialised model.

    pytest bench/test_bench_rollout.py --benchmark-group-by=group --benchmark-columns=median,rounds

CPU (fp32): a small dense and a small MoE model. GPU (bf16): Qwen3-0.6B's shape and a MoE model
with Qwen3-30B-A3B's layer shape at 8 layers. No eos, so every row decodes max_new_tokens and
the work is the same in every round. extra_info carries the median over rounds of prefill and
decode tokens/s and, on GPU, the weight bandwidth of decode (every parameter read once per step,
the floor of a memory-bound step) next to the copy bandwidth measured in the same run.
"""

from __future__ import annotations

import statistics

import pytest
import torch

from bench.conftest import run_benchmark
from gspo_engine import generate
from gspo_engine.benchmarks.e2e import QWEN3_30B_A3B_WIDTHS
from gspo_engine.model import ModelArgs, Qwen3Model

CUDA = torch.cuda.is_available()
DTYPE = torch.bfloat16 if CUDA else torch.float32

# label: (model arguments, batch, prompt length, new tokens)
GPU_CASES = {
    "0.6b-dense-b64": (
        dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
             num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
        64, 256, 256,
    ),
    "30b-a3b-layers-8-b64": (
        dict(QWEN3_30B_A3B_WIDTHS, num_hidden_layers=8, norm_topk_prob=True),
        64, 256, 128,
    ),
}
CPU_CASES = {
    "small-dense-b8": (
        dict(vocab_size=8192, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
             num_attention_heads=8, num_key_value_heads=4, head_dim=32),
        8, 64, 64,
    ),
    "small-moe-b8": (
        dict(vocab_size=8192, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
             num_attention_heads=8, num_key_value_heads=4, head_dim=32,
             num_experts=16, num_experts_per_tok=4, moe_intermediate_size=128, norm_topk_prob=True),
        8, 64, 64,
    ),
}
CASES = GPU_CASES if CUDA else CPU_CASES


def random_model(arguments: dict, device: torch.device) -> Qwen3Model:
    args = ModelArgs(max_position_embeddings=40960, dtype=DTYPE, **arguments)
    with device:
        model = Qwen3Model(args)
    return model.to(DTYPE).eval()


@pytest.mark.parametrize("case", list(CASES))
def test_generate(benchmark, device, copy_gb_per_s, case):
    arguments, batch, prompt_length, new_tokens = CASES[case]
    model = random_model(arguments, device)
    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, arguments["vocab_size"], (batch, prompt_length), generator=generator).tolist()
    outputs = []

    def step():
        outputs.append(generate(model, prompts, max_new_tokens=new_tokens, temperature=1.0, seed=len(outputs)))

    dtype_name = str(DTYPE).removeprefix("torch.")
    benchmark.group = f"generate {case} B={batch} prompt={prompt_length} new={new_tokens} {dtype_name} {device.type}"
    peak_mib = run_benchmark(benchmark, device, step, rounds=3 if CUDA else 2)
    decode_s = statistics.median(out.decode_s for out in outputs)
    benchmark.extra_info.update(
        prefill_tokens_per_s=round(statistics.median(out.prefill_tokens_per_s for out in outputs)),
        decode_tokens_per_s=round(statistics.median(out.decode_tokens_per_s for out in outputs)),
        decode_ms_per_step=round(decode_s / (new_tokens - 1) * 1e3, 3),
        peak_extra_mib=peak_mib,
    )
    if copy_gb_per_s:
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        weight_gb_per_s = weight_bytes * (new_tokens - 1) / decode_s / 1e9
        benchmark.extra_info.update(
            weight_gb_per_s=round(weight_gb_per_s, 1),
            copy_gb_per_s=round(copy_gb_per_s, 1),
            fraction_of_copy=round(weight_gb_per_s / copy_gb_per_s, 3),
        )
