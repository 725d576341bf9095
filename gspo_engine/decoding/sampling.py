"""Drawing the next token: temperature, top-k, top-p, and uniforms keyed by a row's own identity.

A row's draws are a hash of its key (from the seed and its sample id) and the index of the token
drawn within its completion, so its tokens depend on nothing else: not on the batch it is decoded
in, the slot it occupies, the step at which it was admitted, or the rank that holds it.
"""

from __future__ import annotations

import torch

from gspo_kernels.backend import triton_available

_MASK32 = 0xFFFFFFFF
_GOLDEN32 = 0x9E3779B9


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


def token_keys(keys: torch.Tensor, token_index: torch.Tensor) -> torch.Tensor:
    """[B] keys of the draw of token `token_index` [B] (int64, its index in the row's completion)."""
    return mix32(keys ^ ((token_index * _GOLDEN32) & _MASK32))


def _as_int32(value: int) -> int:
    """The int32 whose bits are those of the uint32 `value`."""
    return value - (1 << 32) if value >= 1 << 31 else value


def _mix32_bits(x: torch.Tensor) -> torch.Tensor:
    """mix32 on int32 tensors that hold uint32 bits, in place: int32 products wrap mod 2**32 as uint32 ones
    do, and a right shift is made logical by masking the bits an arithmetic shift copies in."""
    x.bitwise_xor_((x >> 16) & 0xFFFF)
    x.mul_(_as_int32(0x85EBCA6B))
    x.bitwise_xor_((x >> 13) & 0x7FFFF)
    x.mul_(_as_int32(0xC2B2AE35))
    return x.bitwise_xor_((x >> 16) & 0xFFFF)


def keyed_uniform(keys: torch.Tensor, width: int) -> torch.Tensor:
    """[B, width] fp32 uniforms in (0, 1), each a hash of its row's key and its column:
    ((mix32(key ^ mix32(column ^ 0x9E3779B9)) >> 8) + 0.5) / 2**24.

    The draws of a row depend on nothing else, so a row gets the same tokens whatever batch it
    is sampled in: on one process or split across ranks. Hashed in int32 (half the bytes of
    int64, and no masking after each product).
    """
    columns = _mix32_bits(torch.arange(width, device=keys.device, dtype=torch.int32) ^ _as_int32(_GOLDEN32))
    bits = _mix32_bits(keys.to(torch.int32)[:, None] ^ columns[None, :])
    return (((bits >> 8) & 0xFFFFFF).to(torch.float32) + 0.5) * 2.0**-24


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
    or with `keys` ([B] int64, see token_keys) from a hash of each row's key and the column. On CUDA,
    keyed draws without top-k / top-p run a Triton kernel that draws the same token in one pass.
    """
    if temperature == 0:
        tokens = logits.argmax(dim=-1)
        return tokens, logits.log_softmax(dim=-1).gather(-1, tokens[:, None]).squeeze(-1)
    if keys is not None and top_k == 0 and top_p == 1 and logits.is_cuda and triton_available():
        # The same draw in one pass over the logits, the hashing in registers (decoding/sampling_triton.py).
        from gspo_engine.decoding.sampling_triton import keyed_sample

        return keyed_sample(logits.float(), temperature, keys)
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
