"""gspo_engine.generate on CPU without a KV cache budget and with a quarter of the cache it takes without one:
the same tokens, the peak of live tensor memory during generation, and tokens/s.

    PYTHONPATH=.:tests python bench/rollout_budget_memory.py                 # the shapes of bench/RESULTS.md
    PYTHONPATH=.:tests python bench/rollout_budget_memory.py --prompts 16 --max-new-tokens 64   # a quick look

The model: the e2e family's narrow MoE widths (gspo_engine/benchmarks/e2e.py) at 4 layers, fp32, random
weights. Completions end at any of `--eos-ids` token ids (the lowest ones), so they stop at spread-out
lengths as RL completions do. Memory is counted by tests/memory_tracker.py (tensor storage: what the
planner counts), the weights excluded; time is taken on separate, untracked runs (the median of --repeats).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from memory_tracker import TensorMemoryTracker

from gspo_engine.benchmarks.e2e import NARROW_WIDTHS, model_dict
from gspo_engine.model import ModelArgs, Qwen3Model
from gspo_engine.rollout import generate

MIB = 2**20


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--eos-ids", type=int, default=24, help="How many token ids end a completion.")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    return parser.parse_args()


def main() -> None:
    options = parse_args()
    torch.set_num_threads(options.threads)
    torch.manual_seed(0)
    model = Qwen3Model(ModelArgs(dtype=torch.float32, **model_dict(NARROW_WIDTHS, 4))).eval()
    generator = torch.Generator().manual_seed(1)
    lengths = torch.randint(16, 65, (options.prompts,), generator=generator).tolist()
    prompts = [torch.randint(0, NARROW_WIDTHS["vocab_size"], (n,), generator=generator).tolist() for n in lengths]
    common = dict(max_new_tokens=options.max_new_tokens, temperature=1.0, seed=0,
                  eos_token_id=list(range(options.eos_ids)))

    def run(kv_cache_gb):
        seconds, out = [], None
        for _ in range(options.repeats):
            start = time.perf_counter()
            out = generate(model, prompts, kv_cache_gb=kv_cache_gb, **common)
            seconds.append(time.perf_counter() - start)
        with TensorMemoryTracker() as tracker:
            generate(model, prompts, kv_cache_gb=kv_cache_gb, **common)
        return out, statistics.median(seconds), tracker.peak_bytes

    unbounded, unbounded_s, unbounded_peak = run(None)
    quarter_gb = unbounded.kv_cache_bytes / 4 / 1e9
    budgeted, budgeted_s, budgeted_peak = run(quarter_gb)
    assert budgeted.tokens == unbounded.tokens, "the budget changed the completions"
    largest_logp_difference = max((a - b).abs().max().item() for a, b in zip(budgeted.logps, unbounded.logps))

    tokens = sum(len(t) for t in unbounded.tokens)
    print(f"{options.prompts} prompts of 16-64 tokens, max_new_tokens {options.max_new_tokens}, "
          f"{options.eos_ids} eos ids: {tokens:,} completion tokens (mean {tokens / options.prompts:.0f}), "
          f"{sum(unbounded.finished)} ended with eos; tokens identical, log-probs within {largest_logp_difference:.1e}")
    print("| run | slots | KV cache MiB | peak tensor MiB during generate | peak / unbounded KV cache | "
          "active mean / min | decode steps | tokens/s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    kv = unbounded.kv_cache_bytes
    for name, out, seconds, peak in (("unbounded", unbounded, unbounded_s, unbounded_peak),
                                     (f"kv_cache_gb {quarter_gb:.4f} (a quarter)", budgeted, budgeted_s, budgeted_peak)):
        print(f"| {name} | {out.slots} | {out.kv_cache_bytes / MIB:.1f} | {peak / MIB:.1f} | {peak / kv:.1%} | "
              f"{out.active_mean:.1f} / {out.active_min} | {out.decode_steps:,} | {tokens / seconds:,.0f} |")


if __name__ == "__main__":
    main()
