"""Sampling completions with continuous batching over a pool of KV-cache slots: the rollout half of a GSPO step.

The cache is a fixed pool of slots (model/kv_cache.py), as many as `kv_cache_gb` holds (every
prompt at once without a budget). Prompts wait in order; whenever slots are free, the waiting
prompts take them: they are prefilled together (right-padded, in chunks of at most PREFILL_TOKENS
padded tokens) and draw their first token. Then every decode step feeds each slot its last token
and draws the next (decoding/slots.decode_step): sampling, the eos test and the bookkeeping stay on
the device, so on a GPU the loop only waits for it every FINISHED_CHECK_STEPS steps, when the
slots whose sequences have ended are handed to waiting prompts, or, once none waits, the running
sequences are moved into the first slots so that later steps run fewer rows. On CUDA the decode
steps are replayed as CUDA graphs (decoding/graphs.py).

Each completion's draws are keyed by its sample id and the index of the token in the completion
(decoding/sampling.py), so its tokens depend neither on the budget nor on when it was admitted.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from numbers import Integral

import torch

from gspo_engine.decoding.graphs import DecodeRunner, graph_blocker
from gspo_engine.decoding.sampling import keyed_uniform, mix32, row_keys, sample_next, token_keys
from gspo_engine.decoding.slots import Completions, Sampler, SlotState, admit, decode_step
from gspo_engine.device import synchronize
from gspo_engine.model import Qwen3Model
from gspo_engine.model.kv_cache import KVCache, slot_bytes

__all__ = ["Generation", "generate", "keyed_uniform", "mix32", "row_keys", "sample_next", "token_keys",
           "kv_cache_slots", "FINISHED_CHECK_STEPS", "PREFILL_TOKENS"]

# Steps between two looks at which slots have finished on an accelerator; each look waits for the device.
FINISHED_CHECK_STEPS = 8
# Padded prompt tokens per prefill forward: a whole large batch at once would hold activations
# and a [B, 1, T, T] mask of B * T * T bytes; beyond a few thousand tokens a forward gains nothing.
PREFILL_TOKENS = 16384


def finished_check_steps(device: torch.device) -> int:
    """On the CPU a look costs nothing, and every step it saves is work."""
    return 1 if device.type == "cpu" else FINISHED_CHECK_STEPS


@dataclass
class Generation:
    """What `generate` returns; sample i is the completion of prompts[i].

    tokens: the completion without the prompt, ending with the eos token when one was produced.
    logps: float32 [len(tokens[i])] on the CPU, the log-prob of each token under the distribution
        it was drawn from (see `sample_next`).
    finished: whether the completion ended with an eos token (False when max_new_tokens cut it).
    routing: with return_routing on a MoE model, int16 [len(prompt) + len(tokens) - 1,
        num_moe_layers, k] on the CPU: the experts that routed each token the model was fed, that
        is the prompt and every completion token but the last (the inputs of the training forward
        that scores the completion); None otherwise. `routing_replay.replay_experts` lays them
        out for Qwen3Model.forward_hidden(forced_experts=...).
    prefill_s: the prompts' forwards and the draw of every first token; decode_s: the decode steps.
    prefill_tokens: real prompt tokens; decode_tokens: completion tokens drawn after the first.
    slots: the sequences the KV cache holds at once; kv_cache_bytes: its size.
    active_mean / active_min: sequences running per decode step (on a GPU, counted at the last look).
    kv_cache_use: the mean share of the cache's columns that running sequences hold, per decode step.
    decode_steps: the decode steps run (each feeds every running sequence one token).
    """

    tokens: list[list[int]]
    logps: list[torch.Tensor]
    finished: list[bool]
    routing: list[torch.Tensor] | None
    prefill_s: float
    decode_s: float
    prefill_tokens: int
    decode_tokens: int
    slots: int = 0
    kv_cache_bytes: int = 0
    active_mean: float = 0.0
    active_min: int = 0
    kv_cache_use: float = 0.0
    decode_steps: int = 0

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prefill_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else 0.0


def _validate(model, prompts, max_new_tokens, temperature, top_p, top_k, kv_cache_gb) -> None:
    if not prompts:
        raise ValueError("generate needs at least one prompt")
    vocab = model.args.vocab_size
    for index, prompt in enumerate(prompts):
        if not prompt:
            raise ValueError(f"prompt {index} is empty: generation needs at least one token to start from")
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise ValueError(f"prompt {index} holds a token id outside the vocabulary [0, {vocab})")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = no limit), got {top_k}")
    if kv_cache_gb is not None and not kv_cache_gb > 0:
        raise ValueError(f"kv_cache_gb must be > 0 (None = every prompt at once), got {kv_cache_gb}")


def _eos_ids(eos_token_id: int | Iterable[int] | None, device: torch.device) -> torch.Tensor:
    if eos_token_id is None:
        ids = []
    elif isinstance(eos_token_id, Integral):
        ids = [int(eos_token_id)]
    else:
        ids = [int(token) for token in eos_token_id]
    return torch.tensor(ids, dtype=torch.long, device=device)


def kv_cache_slots(args, prompts: int, capacity: int, dtype: torch.dtype, kv_cache_gb: float | None,
                   at_least_one: bool = True) -> int:
    """The sequences a cache of `kv_cache_gb` decimal GB holds at `capacity` columns each, at most `prompts`
    (a ValueError when not even one fits, unless at_least_one is off: then 0)."""
    if kv_cache_gb is None:
        return prompts
    per_slot = slot_bytes(args, capacity, dtype)
    # The tolerance keeps a budget of exactly n slots, computed in floating point, at n.
    slots = min(prompts, int(kv_cache_gb * 1e9 / per_slot + 1e-6))
    if slots < 1 and at_least_one:
        raise ValueError(f"kv_cache_gb = {kv_cache_gb:g} holds no sequence: one of {capacity} columns takes "
                         f"{per_slot / 1e9:.3g} GB")
    return slots


def _sampling_keys(temperature, seed, sample_ids, batch, device) -> torch.Tensor | None:
    """Keys of every sample's draws; None when greedy (nothing is drawn)."""
    if sample_ids is not None:
        if seed is None:
            raise ValueError("sample_ids needs a seed")
        if len(sample_ids) != batch or len(set(sample_ids)) != len(sample_ids):
            raise ValueError(f"sample_ids must hold {batch} distinct ids, one per prompt row")
    if temperature == 0:
        return None
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)))  # from torch's global generator
    return row_keys(seed, list(range(batch)) if sample_ids is None else list(sample_ids), device)


@torch.no_grad()
def generate(
    model: Qwen3Model,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    eos_token_id: int | Iterable[int] | None = None,
    seed: int | None = None,
    sample_ids: list[int] | None = None,
    return_routing: bool = False,
    kv_cache_gb: float | None = None,
    cuda_graphs: bool | None = None,
    vision: list | None = None,
) -> Generation:
    """Up to max_new_tokens tokens after each prompt (token ids), stopping a row at its first eos.

    Runs on the model's device and dtype (or under the caller's autocast). Every draw is keyed by
    the seed, the row's sample id (sample_ids, one distinct integer per prompt; by default its index
    in `prompts`) and the token's index in its completion: the same row gets the same tokens in
    any batch, under any budget, on any number of ranks. seed None draws the seed from torch's
    global generator. kv_cache_gb (decimal GB) bounds the KV cache: as many sequences as it holds
    run at once, the others wait for a free slot (None: every prompt at once). cuda_graphs: replay
    the decode steps as CUDA graphs (None: on CUDA where the model allows it, see
    decoding/graphs.graph_blocker, and eagerly after a capture that fails; True: a failed capture
    raises). See Generation for the outputs and sample_next for
    temperature, top_k and top_p. vision (a Qwen3-VL model): per prompt, its model.qwen3_vl.PromptVision
    (image features and multimodal positions, computed once per prompt) or None for a text-only one; a
    VL model never draws its image / video / vision-marker tokens.
    """
    _validate(model, prompts, max_new_tokens, temperature, top_p, top_k, kv_cache_gb)
    if vision is not None and len(vision) != len(prompts):
        raise ValueError(f"vision holds {len(vision)} entries for {len(prompts)} prompts")
    weight = model.embed_tokens.weight
    device, dtype = weight.device, weight.dtype
    if torch.is_autocast_enabled(device.type):
        # Keys and values come out of autocast's matmuls in its dtype: a cache in the weights'
        # (fp32) dtype would only double its memory and the bytes each step reads.
        dtype = torch.get_autocast_dtype(device.type)
    blocker = graph_blocker(model, device)
    if cuda_graphs and blocker:
        raise ValueError(f"cuda_graphs=True cannot be honoured: {blocker}")
    use_graphs = blocker is None if cuda_graphs is None else cuda_graphs

    batch = len(prompts)
    capacity = max(len(p) for p in prompts) + max_new_tokens - 1  # the last token drawn is never fed back
    slots = kv_cache_slots(model.args, batch, capacity, dtype, kv_cache_gb)
    record_routing = return_routing and bool(model.args.moe_layers)
    routing_shape = (len(model.args.moe_layers), model.args.num_experts_per_tok) if record_routing else None
    vision_args, audio_args = model.args.vision, model.args.audio
    banned_ids = (() if vision_args is None else vision_args.special_token_ids) + (
        () if audio_args is None else audio_args.special_token_ids)
    banned = torch.tensor(banned_ids, device=device) if banned_ids else None
    sampler = Sampler(temperature, top_k, top_p, _eos_ids(eos_token_id, device), max_new_tokens,
                      _sampling_keys(temperature, seed, sample_ids, batch, device), banned)

    cache = KVCache.allocate(model.args, slots, capacity, dtype, device)
    state = SlotState.allocate(slots, batch, device)
    out = Completions.allocate(batch, max_new_tokens, routing_shape, device)
    runner = DecodeRunner(lambda rows, columns: decode_step(model, cache, state, out, sampler, rows, columns),
                          slots, capacity, use_graphs, required=bool(cuda_graphs))
    schedule = _Schedule(prompts, slots, capacity, finished_check_steps(device))
    prompt_experts: list[torch.Tensor | None] = [None] * batch

    def fill_free_slots() -> float:
        """Admit waiting prompts into the free slots; the seconds it took."""
        synchronize(device)
        start = time.perf_counter()
        for slot_ids, samples in schedule.admissions():
            prompt_vision = None if vision is None else [vision[s] for s in samples]
            experts = admit(model, cache, state, out, sampler, slot_ids, [prompts[s] for s in samples], samples,
                            prompt_vision)
            if experts is not None:
                for sample, record in zip(samples, experts):
                    prompt_experts[sample] = record
        synchronize(device)
        return time.perf_counter() - start

    start = time.perf_counter()
    prefill_s = fill_free_slots()
    while True:
        if schedule.time_to_look():
            schedule.release(state.done[: schedule.rows].tolist())
            if schedule.waiting:
                prefill_s += fill_free_slots()
            else:
                moves = schedule.compaction(runner.sizes)
                if moves:
                    source, target = (torch.tensor(side, device=device) for side in zip(*moves))
                    cache.move(source, target, schedule.columns)
                    state.move(source, target, out.discard_row)
            if not schedule.running:
                break
        runner(schedule.rows, schedule.columns)
        schedule.stepped()
    synchronize(device)
    decode_s = time.perf_counter() - start - prefill_s
    return _generation(out, prompts, prompt_experts, record_routing, prefill_s, decode_s, schedule, cache)


class _Schedule:
    """The host's view of the slots: which sample each holds, the columns it holds, what waits, when to look.

    It never reads the device except through `release`, which is handed the slots' ended flags. A
    running slot holds its prompt's columns plus one per step since it was admitted; what a step
    needs (rows, columns) is kept up to date when slots change hands, so a step costs O(1) here.
    """

    def __init__(self, prompts: list[list[int]], slots: int, capacity: int, check_every: int):
        self.prompts, self.capacity, self.check_every = prompts, capacity, check_every
        self.waiting = deque(range(len(prompts)))
        self.holder: list[int | None] = [None] * slots
        self.offset = [0] * slots  # a running slot holds offset + steps columns
        self.steps = 0
        self.running: list[int] = []
        self._offsets = (0, 0)  # the largest and the sum of the running slots' offsets
        self.active_counts: list[int] = []
        self.column_use: list[float] = []

    def _changed(self) -> None:
        self.running = [slot for slot, sample in enumerate(self.holder) if sample is not None]
        offsets = [self.offset[slot] for slot in self.running]
        self._offsets = (max(offsets, default=0), sum(offsets))

    @property
    def rows(self) -> int:
        """Slots 0..rows-1 hold every running sequence."""
        return self.running[-1] + 1 if self.running else 1

    @property
    def columns(self) -> int:
        """Columns the next step attends to: every running slot's, with the one it writes."""
        return max(1, min(self.capacity, self._offsets[0] + self.steps + 1))

    def time_to_look(self) -> bool:
        return self.steps % self.check_every == 0

    def admissions(self):
        """(slot ids, samples) per prefill forward: waiting prompts into free slots, PREFILL_TOKENS at a time."""
        free = [slot for slot, sample in enumerate(self.holder) if sample is None]
        group_slots, group_samples, width = [], [], 0
        for slot in free:
            if not self.waiting:
                break
            sample = self.waiting.popleft()
            length = len(self.prompts[sample])
            if group_samples and max(width, length) * (len(group_samples) + 1) > PREFILL_TOKENS:
                yield group_slots, group_samples
                group_slots, group_samples, width = [], [], 0
            group_slots.append(slot)
            group_samples.append(sample)
            width = max(width, length)
            self.holder[slot] = sample
            self.offset[slot] = length - self.steps
        self._changed()
        if group_samples:
            yield group_slots, group_samples

    def release(self, ended: list[bool]) -> None:
        for slot, done in enumerate(ended):
            if done:
                self.holder[slot] = None
        self._changed()

    def compaction(self, sizes) -> list[tuple[int, int]]:
        """(from, to) slot moves that put the running sequences in the first slots, when that shrinks the step."""
        running = self.running
        if not running or sizes(len(running), 1)[0] >= sizes(self.rows, 1)[0]:
            return []
        holes = [slot for slot in range(len(running)) if self.holder[slot] is None]
        movers = [slot for slot in running if slot >= len(running)]
        for source, target in zip(movers, holes):
            self.holder[target], self.holder[source] = self.holder[source], None
            self.offset[target] = self.offset[source]
        self._changed()
        return list(zip(movers, holes))

    def stepped(self) -> None:
        count = len(self.running)
        self.active_counts.append(count)
        held = self._offsets[1] + count * self.steps
        self.column_use.append(held / (len(self.holder) * self.capacity))
        self.steps += 1


def _generation(out: Completions, prompts, prompt_experts, record_routing, prefill_s, decode_s,
                schedule: _Schedule, cache: KVCache) -> Generation:
    batch = len(prompts)
    lengths = out.lengths[:batch].tolist()
    tokens, logps = out.tokens[:batch].cpu(), out.logps[:batch].cpu()
    routing = None
    if record_routing:
        completion_experts = out.experts[:batch].cpu()
        routing = [torch.cat((prompt_experts[row].cpu(), completion_experts[row, : n - 1]))
                   for row, n in enumerate(lengths)]
    counts = schedule.active_counts
    return Generation(
        tokens=[tokens[row, :n].tolist() for row, n in enumerate(lengths)],
        logps=[logps[row, :n].clone() for row, n in enumerate(lengths)],
        finished=out.finished[:batch].tolist(),
        routing=routing,
        prefill_s=prefill_s,
        decode_s=decode_s,
        prefill_tokens=sum(len(p) for p in prompts),
        decode_tokens=sum(lengths) - batch,
        slots=cache.slots,
        kv_cache_bytes=cache.nbytes,
        active_mean=sum(counts) / len(counts) if counts else 0.0,
        active_min=min(counts) if counts else 0,
        kv_cache_use=sum(schedule.column_use) / len(schedule.column_use) if schedule.column_use else 0.0,
        decode_steps=len(counts),
    )
