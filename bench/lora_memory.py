"""Peak memory of one GSPO step with LoRA rank 16 against full fine-tuning, on random Qwen3 models.

    python bench/lora_memory.py [--models tiny-moe tiny-dense wide-moe] [--rank 16]

Each case runs in its own process (peak RSS is a high-water mark of the process): load the model,
build the trainer, run one GSPO step (rollout of 16 prompts x 8 completions, old log-probs, update
in 2 minibatches, AdamW), then report the process's peak RSS (CPU) or max allocated memory (CUDA),
and the exact bytes of the weights, gradients and AdamW states. "wide-moe" is a wider random
Qwen3-MoE (about 100M parameters, 32 experts) on the tiny tokenizer, where the weights and
optimizer states outweigh the interpreter and libraries that dominate the tiny models' RSS.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

WIDE_MOE = dict(
    hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
    head_dim=64, max_position_embeddings=128, num_experts=32, num_experts_per_tok=4, moe_intermediate_size=512,
    norm_topk_prob=True, dtype=torch.float32,
)


def build_wide_moe(folder: Path) -> Path:
    from gspo_engine.hf_checkpoint import save_pretrained
    from gspo_engine.model import ModelArgs, Qwen3Model
    from gspo_engine.tiny import init_weights, save_tiny_tokenizer, tiny_vocabulary

    model = Qwen3Model(ModelArgs(vocab_size=len(tiny_vocabulary()), **WIDE_MOE))
    init_weights(model, seed=0)
    with tempfile.TemporaryDirectory() as tokenizer_folder:
        save_tiny_tokenizer(tokenizer_folder, model_max_length=WIDE_MOE["max_position_embeddings"])
        model.args.source_path = tokenizer_folder
        save_pretrained(model, folder)
    return folder


def one_step(model: str, rank: int, output_dir: str) -> dict:
    """Run in the child process: one GSPO step, then the memory figures."""
    from gspo_engine.config import config_from_dict
    from gspo_engine.device import peak_memory_mib
    from gspo_engine.trainer import GSPOTrainer

    config = config_from_dict({
        "model": {"name_or_path": model},
        "data": {"builtin": {"tasks": ["copy"], "min_length": 2, "max_length": 3}},
        "rollout": {"prompts_per_step": 16, "group_size": 8, "max_new_tokens": 6},
        "gspo": {"eps_low": 0.2, "eps_high": 0.28, "num_minibatches": 2},
        "optim": {"learning_rate": 1e-3},
        "train": {"steps": 1, "cpu_threads": 1},
        "lora": {"rank": rank},
        "output_dir": output_dir,
    })
    trainer = GSPOTrainer(config, echo=lambda *a, **k: None)
    loaded_mib = peak_memory_mib(trainer.device)
    trainer.train_step()
    params = list(trainer.model.parameters())
    state = sum(t.numel() * t.element_size() for s in trainer.optimizer.state.values() for t in s.values()
                if torch.is_tensor(t) and t.dim() > 0)
    return {
        "model": Path(model).name,
        "mode": f"LoRA r{rank}" if rank else "full",
        "parameters_m": sum(p.numel() for p in params) / 1e6,
        "trained_m": sum(p.numel() for p in params if p.requires_grad) / 1e6,
        "weights_grads_adam_mib": (sum(p.numel() * p.element_size() for p in params)
                                   # a gradient per trained parameter, in its dtype (freed after each optimizer step)
                                   + sum(p.numel() * p.element_size() for p in params if p.requires_grad)
                                   + state) / 2**20,
        "peak_after_load_mib": loaded_mib,
        "peak_after_step_mib": peak_memory_mib(trainer.device),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny-moe", "tiny-dense", "wide-moe"])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--child", nargs=3, metavar=("MODEL", "RANK", "OUTPUT_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one_step(args.child[0], int(args.child[1]), args.child[2])))
        return
    rows = []
    with tempfile.TemporaryDirectory() as root:
        for model in args.models:
            source = str(build_wide_moe(Path(root) / model)) if model == "wide-moe" else model
            for rank in (0, args.rank):
                child = subprocess.run(
                    [sys.executable, __file__, "--child", source, str(rank), f"{root}/run-{model}-{rank}"],
                    capture_output=True, text=True,
                )
                if child.returncode:
                    raise SystemExit(f"{model} rank {rank} failed:\n{child.stderr}")
                rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
    columns = list(rows[0])
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(f"{v:.2f}" if isinstance(v, float) else str(v) for v in row.values()) + " |")


if __name__ == "__main__":
    main()
