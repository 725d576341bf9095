"""Batched sampling of completions with a static KV cache: the rollout half of a GSPO step.

The prompts are left-padded into one batch and prefilled (in row chunks of at most
PREFILL_TOKENS padded tokens); then every step feeds the batch's last tokens through the model
at once, one cache column per step. Sampling, the eos test and the bookkeeping of lengths stay
on the device, so on a GPU the loop itself only waits for the device every FINISHED_CHECK_STEPS
steps, when it stops once every row has ended and drops the rows that have from the batch (and
from the cache), so that they cost nothing afterwards. (The MoE layers' expert dispatch still
checks its indices on the host, once per MoE layer and step.)
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from numbers import Integral

import torch
import torch.nn.functional as F

from gspo_engine.device import synchronize
from gspo_engine.model import Qwen3Model
from gspo_engine.model.kv_cache import KVCache
from gspo_engine.routing_replay import stack_routing

# Steps between two looks at which rows have finished on an accelerator; each look waits for the device.
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
    prefill_s: the prompts' forward and the draw of every first token; decode_s: the later steps.
    prefill_tokens: real prompt tokens; decode_tokens: completion tokens drawn after the first.
    """

    tokens: list[list[int]]
    logps: list[torch.Tensor]
    finished: list[bool]
    routing: list[torch.Tensor] | None
    prefill_s: float
    decode_s: float
    prefill_tokens: int
    decode_tokens: int

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prefill_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else 0.0


_MASK32 = 0xFFFFFFFF


def _mul32(values: torch.Tensor, factor: int) -> torch.Tensor:
    """values * factor mod 2**32 for int64 values below 2**32, in two 16-bit halves so nothing overflows int64."""
    low = values * (factor & 0xFFFF)
    high = ((values * (factor >> 16)) & 0xFFFF) << 16
    return (low + high) & _MASK32


def mix32(values: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finaliser: every input bit flips about half the output bits."""
    values = values ^ (values >> 16)
    values = _mul32(values, 0x85EBCA6B)
    values = values ^ (values >> 13)
    values = _mul32(values, 0xC2B2AE35)
    return values ^ (values >> 16)


def row_keys(seed: int, sample_ids: list[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """One 32-bit key per row [B] int64, from the seed and the row's sample id alone."""
    seed_key = mix32(torch.tensor([seed & _MASK32, ((seed >> 32) & _MASK32) ^ 0x5BD1E995], dtype=torch.long))
    ids = torch.tensor(sample_ids, dtype=torch.long)
    keys = mix32((ids & _MASK32) ^ seed_key[0]) ^ mix32(((ids >> 32) & _MASK32) ^ seed_key[1])
    return keys.to(device)


def keyed_uniform(keys: torch.Tensor, width: int) -> torch.Tensor:
    """[B, width] fp32 uniforms in (0, 1), each a hash of its row's key and its column.

    The draws of a row depend on nothing else, so a row gets the same tokens whatever batch it
    is sampled in: on one process or split across ranks.
    """
    columns = mix32(torch.arange(width, device=keys.device, dtype=torch.long) ^ 0x9E3779B9)
    bits = mix32(keys[:, None] ^ columns[None, :])
    return ((bits >> 8).to(torch.float32) + 0.5) * 2.0**-24


def sample_next(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float, generator: torch.Generator | None,
    keys: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next tokens [B] and their log-probs fp32 [B] from logits fp32 [B, V].

    temperature 0 is greedy: the argmax, with its log-prob log_softmax(logits) (temperature 1,
    nothing filtered). Otherwise, in the order transformers applies them: the logits are divided
    by the temperature, cut to the top_k largest (0 = all), then to the smallest set of the most
    likely tokens whose probability reaches top_p (1 = all); the token is drawn from the softmax
    of what is left, and its log-prob is under that renormalised distribution. With top_k = 0
    and top_p = 1 this is log_softmax(logits / temperature).

    Drawn as argmax(p / q) with q ~ Exp(1) per token (gpt-fast's way): the same distribution as
    torch.multinomial, without a wait for the device. The uniforms behind q come from `generator`,
    or with `keys` ([B] int64, see row_keys) from a hash of each row's key and the column.
    """
    if temperature == 0:
        tokens = logits.argmax(dim=-1)
        return tokens, logits.log_softmax(dim=-1).gather(-1, tokens[:, None]).squeeze(-1)
    scaled = logits / temperature
    # Token ids of the columns of `scaled` once it is cut down (sorted, most likely first).
    candidates = None
    if top_k > 0:
        scaled, candidates = scaled.topk(min(top_k, scaled.shape[-1]), dim=-1)
    if top_p < 1:
        if candidates is None:
            scaled, candidates = scaled.sort(dim=-1, descending=True)
        probs = scaled.softmax(dim=-1)
        # A token is needed while the more likely ones have not reached top_p yet; the most likely always is.
        mass_before = probs.cumsum(dim=-1) - probs
        scaled = scaled.masked_fill(mass_before >= top_p, float("-inf"))
    logps = scaled.log_softmax(dim=-1)
    # q = -log(u), u ~ U[0, 1): a few times faster on the CPU than exponential_. The clamp keeps
    # p / q finite (and 0 for a filtered token) should u ever round to 1.
    if keys is None:
        uniform = torch.rand(logps.shape, generator=generator, device=logps.device)
    else:
        uniform = keyed_uniform(keys, logps.shape[-1])
    noise = uniform.log_().neg_()
    choice = (logps.exp() / noise.clamp_(min=torch.finfo(noise.dtype).tiny)).argmax(dim=-1, keepdim=True)
    chosen_logps = logps.gather(-1, choice).squeeze(-1)
    tokens = choice if candidates is None else candidates.gather(-1, choice)
    return tokens.squeeze(-1), chosen_logps


def _validate(model, prompts, max_new_tokens, temperature, top_p, top_k) -> None:
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


def _eos_ids(eos_token_id: int | Iterable[int] | None, device: torch.device) -> torch.Tensor:
    if eos_token_id is None:
        ids = []
    elif isinstance(eos_token_id, Integral):
        ids = [int(eos_token_id)]
    else:
        ids = [int(token) for token in eos_token_id]
    return torch.tensor(ids, dtype=torch.long, device=device)


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
) -> Generation:
    """Up to max_new_tokens tokens after each prompt (token ids), stopping a row at its first eos.

    Runs on the model's device and dtype (or under the caller's autocast). seed draws from a
    generator of its own (the same prompts, options and device give the same completions); None
    draws from torch's global one. With sample_ids (one distinct integer per prompt row) and a
    seed, a row's draws depend only on the seed, its id and the step: the same row gets the same
    tokens in any batch, which keeps data-parallel rollouts equal to a single process's. See
    Generation for the outputs and sample_next for temperature, top_k and top_p.
    """
    _validate(model, prompts, max_new_tokens, temperature, top_p, top_k)
    weight = model.embed_tokens.weight
    device, dtype = weight.device, weight.dtype
    if torch.is_autocast_enabled(device.type):
        # Keys and values come out of autocast's matmuls in its dtype: a cache in the weights'
        # (fp32) dtype would only double its memory and the bytes each step reads.
        dtype = torch.get_autocast_dtype(device.type)
    batch = len(prompts)
    prompt_lengths = [len(prompt) for prompt in prompts]
    width = max(prompt_lengths)
    record_routing = return_routing and bool(model.args.moe_layers)

    input_ids = torch.zeros(batch, width, dtype=torch.long)
    attention_mask = torch.zeros(batch, width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.tensor(prompt)
        attention_mask[row, width - len(prompt) :] = 1
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    eos_ids = _eos_ids(eos_token_id, device)
    generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
    keys = None
    if sample_ids is not None:
        if seed is None:
            raise ValueError("sample_ids needs a seed")
        if len(sample_ids) != len(prompts) or len(set(sample_ids)) != len(sample_ids):
            raise ValueError(f"sample_ids must hold {len(prompts)} distinct ids, one per prompt row")
        keys = row_keys(seed, sample_ids, device)
    check_every = finished_check_steps(device)

    # Indexed by the original row; `rows` maps the rows still in the batch to them.
    tokens = torch.zeros(batch, max_new_tokens, dtype=torch.long, device=device)
    logps = torch.zeros(batch, max_new_tokens, dtype=torch.float32, device=device)
    lengths = torch.zeros(batch, dtype=torch.long, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    rows = torch.arange(batch, device=device)

    def record(step: int, next_tokens: torch.Tensor, next_logps: torch.Tensor) -> None:
        # Rows past their eos still draw tokens until they are dropped; those are not counted.
        tokens[rows, step] = next_tokens
        logps[rows, step] = next_logps
        lengths[rows] += ~finished[rows]
        finished[rows] |= torch.isin(next_tokens, eos_ids)

    def next_from(last_hidden: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(last_hidden, model.lm_head_weight).float()
        step_keys = None if keys is None else mix32(keys[rows] ^ (step * 0x9E3779B9 & _MASK32))
        return sample_next(logits, temperature, top_k, top_p, generator, step_keys)

    # The last token drawn is never fed back, hence max_new_tokens - 1 decode columns.
    cache = KVCache.allocate(model.args, batch, width + max_new_tokens - 1, dtype, device)
    synchronize(device)
    start = time.perf_counter()
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    chunk_rows = max(1, PREFILL_TOKENS // width)
    last_hidden, chunk_experts = [], []
    for first in range(0, batch, chunk_rows):
        chunk = slice(first, first + chunk_rows)
        output = model.forward_hidden(
            input_ids[chunk], attention_mask[chunk], position_ids[chunk],
            cache=cache.row_slice(chunk.start, chunk.stop),
        )
        # A copy, so that the chunk's hidden states [rows, width, H] can be freed.
        last_hidden.append(output.hidden_states[:, -1].clone())
        if record_routing:
            chunk_experts.append(stack_routing(output.routing, output.hidden_states.shape[0], width))
    cache.advance(width)
    if record_routing:
        prompt_experts = torch.cat(chunk_experts)
        completion_experts = torch.zeros(
            batch, max_new_tokens, *prompt_experts.shape[2:], dtype=torch.int16, device=device
        )
    next_tokens, next_logps = next_from(torch.cat(last_hidden), 0)
    record(0, next_tokens, next_logps)
    synchronize(device)
    prefill_s = time.perf_counter() - start

    start = time.perf_counter()
    positions = torch.tensor(prompt_lengths, device=device)  # of the token fed next, counting real tokens only
    for step in range(1, max_new_tokens):
        if step % check_every == 0:
            active = (~finished[rows]).nonzero().squeeze(-1)
            if active.numel() == 0:
                break
            if active.numel() < rows.numel():
                cache.keep_rows(active)
                rows, next_tokens, positions = rows[active], next_tokens[active], positions[active]
        output = model.forward_hidden(next_tokens[:, None], position_ids=positions[:, None], cache=cache)
        if record_routing:
            # The experts of the token drawn at the previous step, the one just fed.
            experts = torch.stack([r.expert_indices for r in output.routing], dim=1)
            completion_experts[rows, step - 1] = experts.to(torch.int16)
        positions = positions + 1
        next_tokens, next_logps = next_from(output.hidden_states[:, -1], step)
        record(step, next_tokens, next_logps)
    synchronize(device)
    decode_s = time.perf_counter() - start

    lengths_list = lengths.tolist()
    tokens_cpu, logps_cpu = tokens.cpu(), logps.cpu()
    routing = None
    if record_routing:
        prompt_experts_cpu, completion_experts_cpu = prompt_experts.cpu(), completion_experts.cpu()
        routing = [
            torch.cat((prompt_experts_cpu[row, width - prompt_lengths[row] :], completion_experts_cpu[row, : n - 1]))
            for row, n in enumerate(lengths_list)
        ]
    return Generation(
        tokens=[tokens_cpu[row, :n].tolist() for row, n in enumerate(lengths_list)],
        logps=[logps_cpu[row, :n].clone() for row, n in enumerate(lengths_list)],
        finished=finished.tolist(),
        routing=routing,
        prefill_s=prefill_s,
        decode_s=decode_s,
        prefill_tokens=sum(prompt_lengths),
        decode_tokens=sum(lengths_list) - batch,
    )
