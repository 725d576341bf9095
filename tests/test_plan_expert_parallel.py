"""The planner's expert-parallel estimate (`gspo-engine plan CONFIG --gpus 2` with distributed.expert_parallel
2) against the peaks of each rank of a real 2-rank step with the experts split over the ranks: torchrun,
gloo on the CPU, fp32.

tests/plan_rank_peaks.py measures each phase's peak on each rank (DTensor shards, the experts' local
blocks among them, and FSDP2's gathered buffers counted), as for the FSDP2 cases of
tests/test_plan_distributed.py; here the states hold 1/2 of the experts and 1/2 of the rest, FSDP2
gathers only the non-expert weights, and the MoE layers exchange their tokens. `pytest
tests/test_plan_expert_parallel.py -s` prints the table docs/scaling.md quotes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gspo_engine.config import load_config
from gspo_engine.planner import make_plan
from gspo_engine.planner.memory_model import fsdp_sizes, model_sizes
from test_plan_distributed import CONFIGS, COMMON, ERROR_BOUND, LONG, SHORT, TIMEOUT_S, case_id, deeper_tiny_model

ROOT = Path(__file__).resolve().parents[1]
RANKS = 2
EP = [f"distributed.expert_parallel={RANKS}"]

# case: (decoder blocks of tiny-moe, overrides); the shapes of test_plan_distributed.py's tiny-moe cases.
CASES = {
    "tiny-moe, ep 2": (2, LONG),
    "tiny-moe, 4 layers, short, ep 2": (4, SHORT),
}


def overrides(case: str, base: Path) -> list[str]:
    layers, shapes = CASES[case]
    model = "tiny-moe" if layers == 2 else deeper_tiny_model("tiny-moe", layers, base / f"tiny-moe-{layers}-layers")
    return COMMON + shapes + EP + [f"model.name_or_path={model}", f"output_dir={base / case_id(case)}"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("plan_ep_rank_peaks")
    cases = [{"id": case_id(case), "config": str(CONFIGS / "tiny-moe.yaml"), "overrides": overrides(case, base)}
             for case in CASES]
    (base / "cases.json").write_text(json.dumps(cases))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(RANKS),
               str(ROOT / "tests" / "plan_rank_peaks.py"), str(base / "cases.json"), str(base)]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    peaks = {case: [json.loads((base / f"{case_id(case)}-rank{rank}.json").read_text()) for rank in range(RANKS)]
             for case in CASES}
    return {"base": base, "peaks": peaks}


def plan_of(case: str, runs: dict):
    return make_plan(load_config(CONFIGS / "tiny-moe.yaml", overrides(case, runs["base"])), gpus=RANKS).memory


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_phase_peaks_of_each_expert_parallel_rank_against_the_plan(runs, case):
    memory = plan_of(case, runs)
    assert memory.expert_parallel == RANKS
    estimated = {"rollout": memory.rollout_peak, "scoring": memory.scoring.peak(memory.states),
                 "training": memory.training.peak(memory.states)}
    for phase in ("rollout", "scoring", "training"):
        peaks = [rank[phase]["peak"] for rank in runs["peaks"][case]]
        errors = [estimated[phase] / peak - 1 for peak in peaks]
        print(f"\n| {case} | {phase} | {' / '.join(f'{peak / 2**20:.2f}' for peak in peaks)} MiB | "
              f"{estimated[phase] / 2**20:.2f} MiB | {' / '.join(f'{error:+.1%}' for error in errors)} |", end="")
        for peak, error in zip(peaks, errors):
            assert abs(error) <= ERROR_BOUND, (phase, peak, estimated[phase])


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_fsdp2_gathers_and_reduces_only_the_non_expert_weights(runs, case):
    """What FSDP2 holds on each rank is the plan's FSDP2 terms of the model without its experts."""
    memory = plan_of(case, runs)
    rollout, scoring, training = memory.rollout, memory.scoring, memory.training
    late = rollout.gather_output
    for peaks in runs["peaks"][case]:
        assert 0 <= peaks["rollout"]["gathered"] - (rollout.generation_weights + rollout.gather_output) <= late
        assert 0 <= peaks["rollout"]["gather_added"] - rollout.generation_weights <= late
        assert 0 <= peaks["scoring"]["gathered"] - scoring.compute_weights <= late
        assert 0 <= peaks["training"]["gathered_backward"] - training.compute_weights <= late
        assert peaks["training"]["reduce_scatter"] == training.block_gradients


def test_expert_parallel_states_and_gathers_count_the_experts_once_per_group():
    """Arithmetic of the plan: the experts 1/ep per GPU, the rest 1/gpus; generation gathers no expert."""
    from gspo_engine.model import build_model
    from gspo_engine.planner.released_shapes import plan_model_args

    import torch

    config = load_config(CONFIGS / "moe.yaml", ["distributed.expert_parallel=4"])
    args, _ = plan_model_args(config.model.name_or_path)
    with torch.device("meta"):
        sizes = model_sizes(build_model(args))
    memory = make_plan(config, gpus=16).memory
    per_gpu = (sizes.total - sizes.all_experts) / 16 + sizes.all_experts / 4
    assert memory.states.weights == pytest.approx(4 * per_gpu)
    assert memory.states.optimizer == pytest.approx(8 * per_gpu)
    fsdp = fsdp_sizes(sizes, 4)
    assert fsdp.total == sizes.total - sizes.all_experts and fsdp.root == sizes.root
    # bf16: the non-expert weights gathered, and one layer's local experts cast as it runs
    assert memory.rollout.generation_weights == pytest.approx(2 * fsdp.total + 2 * sizes.layer_experts / 4)
    fsdp_alone = make_plan(load_config(CONFIGS / "moe.yaml", ["distributed.expert_parallel=1"]), gpus=16).memory
    assert memory.rollout.generation_weights < fsdp_alone.rollout.generation_weights / 15
