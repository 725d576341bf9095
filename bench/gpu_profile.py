"""Where the GPU time goes: the fused linear loss's tile strategies side by side, and profiles of
the GSPO loss and of one end-to-end update step (ours and transformers'). Needs a GPU.

    PYTHONPATH=. python bench/gpu_profile.py --out bench/out [--parts fused-linear,loss,e2e]

Prints, and writes to OUT/profile.json and OUT/profile.txt:
- fused-linear: for each strategy, median ms of forward + backward and the peak memory above the
  inputs, at N = 16,384 tokens, H = 4096, V = 151,936, bf16;
- the top CUDA kernels of one update step of each e2e implementation;
- the host side of gk.gspo_loss at B = 512, T = 2048: its top CPU operators and how many device
  synchronisations one forward + backward makes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import pathlib

import torch
from torch.profiler import ProfilerActivity, profile

import gspo_kernels as gk
from gspo_engine.benchmarks import e2e, fused_linear
from gspo_engine.benchmarks.timing import median_seconds
from gspo_engine.device import synchronize
from gspo_kernels import fused_linear_stream

# (row chunk, vocabulary chunk) of the PyTorch tile path: logits tiles through cuBLAS.
TILES = [(512, 8192), (2048, 8192), (4096, 8192), (4096, 16384), (8192, 8192)]
PARTS = ("fused-linear", "loss", "e2e")


def timed(step, device: torch.device, rounds: int = 3, warmup: int = 2) -> tuple[float, float | None]:
    """(median ms, peak MiB above what was allocated before the first call; None off a GPU).

    Unlike the benchmark rows' peak (taken after a warm-up), this one counts the gradients the
    step creates, as the strategies' figures in bench/RESULTS.md do.
    """
    cuda = device.type == "cuda"
    synchronize(device)
    base = torch.cuda.memory_allocated(device) if cuda else 0
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    seconds = median_seconds(step, device, rounds, warmup=warmup)
    peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20 if cuda else None
    return seconds * 1e3, peak


@contextlib.contextmanager
def tile_shape(rows: int, vocab: int):
    saved = dict(fused_linear_stream.STREAM_TILES)
    fused_linear_stream.STREAM_TILES.update(cpu=(rows, vocab), cuda=(rows, vocab))
    try:
        yield
    finally:
        fused_linear_stream.STREAM_TILES.update(saved)


def fused_linear_strategies(batch: int, steps: int, hidden_size: int, vocab: int, device: torch.device,
                            mask_prompt: bool, tiles=TILES, budgets=(2048, 3072)) -> list[dict]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    inputs = fused_linear.make_inputs(batch, steps, hidden_size, vocab, dtype=dtype, device=device)
    if mask_prompt:  # the e2e update's layout: the first quarter of each row is prompt
        inputs["mask"][:, : steps // 4] = 0
    case = f"B={batch} T={steps} H={hidden_size} V={vocab}"
    runs = [("default", fused_linear.make_step("fused", inputs), contextlib.nullcontext()),
            ("PyTorch epilogues, all recomputed", fused_linear.make_step("fused_torch", inputs),
             contextlib.nullcontext())]
    for rows_chunk, vocab_chunk in tiles:
        label = f"cuBLAS tiles {rows_chunk}x{vocab_chunk} with Triton epilogues, all recomputed"
        runs.append((label, fused_linear.make_step("fused_recompute", inputs), tile_shape(rows_chunk, vocab_chunk)))
    for budget in budgets:
        def kept(budget=budget):
            hidden, weight = inputs["hidden"], inputs["weight"]
            hidden.grad = weight.grad = None
            gk.fused_linear_gspo_loss(hidden, weight, inputs["targets"], inputs["old_logps"], inputs["advantages"],
                                      inputs["mask"], eps_low=3e-4, eps_high=4e-4,
                                      chunk_budget_mib=budget)[0].backward()
        runs.append((f"kept logits, budget {budget} MiB", kept, contextlib.nullcontext()))
    rows = []
    for label, step, context in runs:
        with context:
            ms, mib = timed(step, device)
        rows.append({"case": case, "strategy": label, "median_ms": ms, "peak_mib": mib})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def kernel_table(step, device: torch.device, row_limit: int = 30) -> str:
    for _ in range(2):
        step()
    synchronize(device)
    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        step()
        synchronize(device)
    return prof.key_averages().table(sort_by="cuda_time_total" if cuda else "cpu_time_total", row_limit=row_limit,
                                     max_name_column_width=60)


def e2e_profiles(device: torch.device, scale: str) -> dict[str, str]:
    _, widths, layers, (batch, length), _ = e2e.SCALES[scale]
    model = e2e.model_dict(widths, layers)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tables = {}
    for name in (e2e.COMMON, e2e.OURS):
        step = e2e.update_step(name, model, batch, length, device, dtype)
        tables[name] = kernel_table(step, device)
        print(f"\n== e2e update, {name}\n{tables[name]}", flush=True)
        del step
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return tables


def loss_host_profile() -> dict:
    gen = torch.Generator(device="cuda").manual_seed(0)
    shape = (512, 2048)
    logps = (torch.randn(shape, generator=gen, device="cuda") * 0.1 - 2).bfloat16().requires_grad_()
    old = (logps.detach().float() + 0.01 * torch.randn(shape, generator=gen, device="cuda")).bfloat16()
    advantages = torch.randn(shape[0], generator=gen, device="cuda")
    mask = torch.ones(shape, dtype=torch.bool, device="cuda")

    def step():
        logps.grad = None
        gk.gspo_loss(logps, old, advantages, mask, eps_low=3e-4, eps_high=4e-4)[0].backward()

    ms, _ = timed(step, torch.device("cuda"), rounds=20)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    events = prof.key_averages()
    syncs = sum(e.count for e in events if e.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize",
                                                      "aten::_local_scalar_dense", "aten::item"))
    table = events.table(sort_by="cpu_time_total", row_limit=14, max_name_column_width=60)
    print(f"\n== gk.gspo_loss B=512 T=2048 bf16: {ms:.3f} ms, {syncs} host syncs\n{table}", flush=True)
    return {"median_ms": ms, "host_syncs": syncs, "table": table}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench/out")
    parser.add_argument("--parts", default=",".join(PARTS), type=lambda text: text.split(","),
                        help=f"Comma-separated parts to run (default: {','.join(PARTS)}).")
    args = parser.parse_args()
    unknown = [part for part in args.parts if part not in PARTS]
    if unknown:
        parser.error(f"unknown part {unknown[0]!r}; choose from {', '.join(PARTS)}")
    if not torch.cuda.is_available():
        print("no GPU: nothing to profile")
        return 0
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cuda = torch.device("cuda")
    results, tables = {}, []
    if "fused-linear" in args.parts:
        results["fused_linear"] = (fused_linear_strategies(4, 4096, 4096, 151936, cuda, mask_prompt=False)
                                   + fused_linear_strategies(8, 1024, 4096, 151936, cuda, mask_prompt=True))
    if "loss" in args.parts:
        results["loss"] = loss_host_profile()
        tables.append(results["loss"]["table"])
    if "e2e" in args.parts:
        results["e2e"] = e2e_profiles(cuda, "gpu")
        tables += results["e2e"].values()
    (out / "profile.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "profile.txt").write_text("\n".join(tables) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
