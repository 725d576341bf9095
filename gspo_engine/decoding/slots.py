"""The decoding slots' state on the device, and the two things done to it: admitting prompts and a decode step.

Every slot holds one sequence (or none). What a slot knows lives in tensors of one row per slot
(`SlotState`); what the sequences produce lives in tensors of one row per sample
(`Completions`), written through the slot's sample index. A free slot, or one whose sequence has
ended but which still decodes until the host next looks, writes to the extra last row of
`Completions`, which nobody reads. `decode_step` reads and writes these tensors in place and
nothing else, with shapes fixed by (rows, columns): the same code runs eagerly and as a CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gspo_engine.decoding.sampling import sample_next, token_keys
from gspo_engine.model import Qwen3Model
from gspo_engine.model.kv_cache import KVCache
from gspo_engine.routing_replay import stack_routing


@dataclass(frozen=True)
class Sampler:
    """How the next token is drawn and when a sequence ends; `keys` [N] int64 per sample, None when greedy."""

    temperature: float
    top_k: int
    top_p: float
    eos_ids: torch.Tensor  # int64 [E], possibly empty
    max_new_tokens: int
    keys: torch.Tensor | None
    banned_ids: torch.Tensor | None = None  # int64 [n]: tokens never drawn (a VL model's image / vision markers)

    def draw(self, model: Qwen3Model, hidden: torch.Tensor, sample_keys: torch.Tensor | None,
             token_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens [R] and log-probs fp32 [R] from the last hidden states [R, H] of R rows."""
        logits = F.linear(hidden, model.lm_head_weight).float()
        if self.banned_ids is not None:
            logits = logits.index_fill(-1, self.banned_ids, float("-inf"))
        keys = None if sample_keys is None else token_keys(sample_keys, token_index)
        return sample_next(logits, self.temperature, self.top_k, self.top_p, None, keys)


@dataclass
class Completions:
    """Per sample, on the device; N + 1 rows, the last one written by slots that hold no running sequence.

    tokens int64 / logps fp32 [N + 1, max_new_tokens]; lengths int64 [N + 1] (tokens drawn, the eos
    included); finished bool [N + 1] (ended with an eos); experts int16 [N + 1, max_new_tokens,
    moe_layers, k] or None: the experts of each completion token fed back (token t at index t).
    """

    tokens: torch.Tensor
    logps: torch.Tensor
    lengths: torch.Tensor
    finished: torch.Tensor
    experts: torch.Tensor | None

    @classmethod
    def allocate(cls, samples: int, max_new_tokens: int, routing_shape: tuple[int, int] | None,
                 device: torch.device) -> "Completions":
        rows = samples + 1
        experts = None
        if routing_shape is not None:
            experts = torch.zeros(rows, max_new_tokens, *routing_shape, dtype=torch.int16, device=device)
        return cls(
            torch.zeros(rows, max_new_tokens, dtype=torch.long, device=device),
            torch.zeros(rows, max_new_tokens, dtype=torch.float32, device=device),
            torch.zeros(rows, dtype=torch.long, device=device),
            torch.zeros(rows, dtype=torch.bool, device=device),
            experts,
        )

    @property
    def discard_row(self) -> int:
        return self.lengths.shape[0] - 1


@dataclass
class SlotState:
    """Per slot [S], on the device: the token fed next, completion tokens drawn, ended, sample index, key, and
    position_offset: what a token's position exceeds its column by (a prompt with images ends below its
    length in multimodal RoPE, model/mrope.py; 0 otherwise)."""

    token: torch.Tensor
    drawn: torch.Tensor
    done: torch.Tensor
    sample: torch.Tensor
    key: torch.Tensor
    position_offset: torch.Tensor

    @classmethod
    def allocate(cls, slots: int, discard_row: int, device: torch.device) -> "SlotState":
        def zeros(dtype):
            return torch.zeros(slots, dtype=dtype, device=device)

        return cls(zeros(torch.long), zeros(torch.long), torch.ones(slots, dtype=torch.bool, device=device),
                   torch.full((slots,), discard_row, dtype=torch.long, device=device), zeros(torch.long),
                   zeros(torch.long))

    def move(self, source: torch.Tensor, target: torch.Tensor, discard_row: int) -> None:
        """Slots `source` [n] go to slots `target` [n]; the sources are left free (ended, writing nowhere)."""
        for tensor in (self.token, self.drawn, self.done, self.sample, self.key, self.position_offset):
            tensor[target] = tensor[source]
        self.done[source] = True
        self.sample[source] = discard_row


def _record(slots: SlotState, at, out: Completions, sampler: Sampler, tokens: torch.Tensor, logps: torch.Tensor,
            experts: torch.Tensor | None) -> None:
    """Store the tokens drawn by slots `at` (an index or a slice) and advance their bookkeeping, on the device.

    experts [R, moe_layers, k]: those of the token each slot was fed, the completion's token drawn - 1.
    """
    drawn, done = slots.drawn[at], slots.done[at]
    target = torch.where(done, out.discard_row, slots.sample[at])
    column = drawn.clamp(max=sampler.max_new_tokens - 1)
    out.tokens[target, column] = tokens
    out.logps[target, column] = logps
    out.lengths[target] = drawn + 1
    # Against each eos id (a handful): torch.isin may sort, this is one fixed-shape comparison.
    ended = (tokens[:, None] == sampler.eos_ids[None, :]).any(dim=-1)
    out.finished[target] = ended
    if experts is not None:
        out.experts[target, (drawn - 1).clamp(min=0)] = experts.to(torch.int16)
    slots.done[at] = done | ended | (drawn + 1 >= sampler.max_new_tokens)
    slots.token[at] = tokens
    slots.drawn[at] = (drawn + 1).clamp(max=sampler.max_new_tokens)


def decode_step(model: Qwen3Model, cache: KVCache, slots: SlotState, out: Completions, sampler: Sampler,
                rows: int, columns: int) -> None:
    """Feed every slot 0..rows-1 its last token and draw the next, attending to `columns` cache columns.

    Reads and writes the slot, cache and completion tensors in place; no value reaches the host.
    """
    view = cache.decode(rows, columns)
    positions = view.column_index + slots.position_offset[:rows]
    output = model.forward_hidden(slots.token[:rows, None], position_ids=positions[:, None], cache=view)
    keys = None if sampler.keys is None else slots.key[:rows]
    tokens, logps = sampler.draw(model, output.hidden_states[:, -1], keys, slots.drawn[:rows])
    experts = None
    if out.experts is not None:
        experts = torch.stack([r.expert_indices for r in output.routing], dim=1)
    _record(slots, slice(0, rows), out, sampler, tokens, logps, experts)


def admit(model: Qwen3Model, cache: KVCache, slots: SlotState, out: Completions, sampler: Sampler,
          slot_ids: list[int], prompts: list[list[int]], samples: list[int],
          vision: list | None = None) -> list[torch.Tensor] | None:
    """Prefill `prompts` (those of `samples`) into the free slots `slot_ids` and draw each one's first token.

    One right-padded forward; returns, when out.experts is kept, each prompt's experts
    [len(prompt), moe_layers, k] int16 on the device (None otherwise). vision: per prompt, its
    model.qwen3_vl.PromptVision or None (a Qwen3-VL model's prompts with images).
    """
    device = slots.token.device
    rows, width = len(samples), max(len(p) for p in prompts)
    input_ids = torch.zeros(rows, width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, : len(prompt)] = torch.tensor(prompt)
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    attention_mask = (torch.arange(width, device=device)[None, :] < lengths[:, None]).long()
    at = torch.tensor(slot_ids, device=device)
    sample_index = torch.tensor(samples, device=device)
    position_ids = torch.arange(width, device=device)[None].expand(rows, -1)
    extra = {}
    if vision is not None and any(v is not None for v in vision):
        position_ids, offsets = _vision_prefill(vision, position_ids)
        # Each row's PromptVision: the model takes its stored image (and audio) features, in row order.
        extra["visions"] = list(vision)
        slots.position_offset[at] = offsets
    else:
        slots.position_offset[at] = 0
    output = model.forward_hidden(
        input_ids.to(device), attention_mask, position_ids, cache=cache.prefill(at, lengths), **extra
    )
    slots.sample[at] = sample_index
    slots.done[at] = False
    slots.drawn[at] = 0
    if sampler.keys is not None:
        slots.key[at] = sampler.keys[sample_index]
    last = output.hidden_states[torch.arange(rows, device=device), lengths - 1]
    keys = None if sampler.keys is None else slots.key[at]
    tokens, logps = sampler.draw(model, last, keys, slots.drawn[at])
    _record(slots, at, out, sampler, tokens, logps, None)
    if out.experts is None:
        return None
    experts = stack_routing(output.routing, rows, width).to(torch.int16)
    return [experts[row, : len(prompt)] for row, prompt in enumerate(prompts)]


def _vision_prefill(vision: list, text_positions: torch.Tensor):
    """Multimodal position_ids [3, R, W] and each row's position offset [R]."""
    position_ids = text_positions[None].expand(3, -1, -1).clone()
    offsets = torch.zeros(position_ids.shape[1], dtype=torch.long, device=position_ids.device)
    for row, prompt in enumerate(vision):
        if prompt is None:
            continue
        position_ids[:, row, : prompt.position_ids.shape[1]] = prompt.position_ids
        offsets[row] = prompt.delta
    return position_ids, offsets
