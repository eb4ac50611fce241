"""Text generation: read the prompt once, then produce one token at a time on the KV cache.

An autoregressive model scores the next token from everything before it. Generating N tokens naively
means N full forward passes over a growing sequence:

    naive:  step t runs the whole sequence 0..t through the model        O(t) tokens, O(t^2) attention
    cached: prefill  ─ the prompt (T tokens) runs once, in parallel; every layer writes its keys and
                       values into a preallocated KV cache (model.set_kv_cache)
            decode   ─ each step runs ONE new token: its query attends to the cached keys/values,
                       and its own key/value is appended
                                                                   O(1) tokens, O(t) attention

    positions    0 1 2 ... T-1 │ T   T+1  ...
                 └── prefill ──┘ └ decode, one token per forward ┘
    KV cache     [k v][k v] ... [k v][k v] ...   (B, nkv, T + max_new_tokens, hs) per layer, filled left to right

Why it pays: the keys and values of position i never change once computed (causal attention: position i
only sees 0..i), so recomputing them at every step is pure waste. With the cache, step t costs the
projections and MLP of one token plus one t-long attention row: the work per generated token drops
from O(t^2) attention + O(t) projections (rerunning the prefix) to O(t) + O(1). The price is memory:
2 * n_layer * nkv * hs numbers per cached position (0.5 MB per token for Llama-2-7B in bf16; grouped-
query attention exists largely to shrink this). Decoding one token is a matrix-vector product against
every weight, so its speed is bounded by how fast the weights stream from memory, not by arithmetic:
bf16 weights (half the bytes of float32) decode faster wherever bf16 kernels are fast.

Sampling (`sample_next_token`): temperature 0 takes the most likely token (greedy); otherwise logits are
divided by the temperature (< 1 sharpens, > 1 flattens), optionally cut to the `top_k` most likely
tokens and/or to the smallest set whose probability reaches `top_p` (nucleus sampling, Holtzman et al.
2019), and a token is drawn from the softmax.

What the generate/*.py scripts add around this (device and dtype choice, loading, streaming text,
timing) is in lit_lora/workflows/inference.py; faster decoding (compiled, int8 weights) in lit_lora/speed/decoding.py.
"""

from typing import Callable, List, Optional, Sequence, Union

import torch

from lit_lora.model import Llama


# ----------------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------------


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row (B, V), set the rest to -inf. Ties with the k-th value stay."""
    k = min(k, logits.size(-1))
    kth_largest = torch.topk(logits, k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth_largest, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filtering: keep the most likely tokens of each row (B, V) until their probability sums to
    at least p (always at least the most likely one); set the rest to -inf."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
    sorted_probs = sorted_logits.softmax(dim=-1)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # probability of the tokens ranked above each one
    drop_sorted = mass_before >= p  # the set before this token already reaches p
    drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def sample_next_token(logits: torch.Tensor, temperature: float = 0.8, top_k: Optional[int] = None,
                      top_p: Optional[float] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """logits (B, V) of the next position -> token ids (B,). temperature 0 is greedy (argmax)."""
    logits = logits.float()  # sample in float32 even for a bf16 model (CPU argmax is also 2x faster on it)
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None and top_p < 1.0:
        logits = top_p_filter(logits, top_p)
    probs = logits.softmax(dim=-1)  # (B, V)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)  # (B,)


MIN_TEMPERATURE = 1e-5


def check_generation_settings(max_new_tokens: int, temperature: float, top_k: Optional[int], top_p: Optional[float]) -> None:
    """One-line errors for settings `generate` cannot use (the scripts check them before loading a model)."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if not (temperature == 0 or MIN_TEMPERATURE <= temperature < float("inf")):  # NaN fails both
        # logits / 1e-45 overflow to inf and the softmax to NaN; so small a temperature is greedy anyway
        raise ValueError(f"temperature must be 0 (greedy) or between {MIN_TEMPERATURE} and infinity, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be a positive integer, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


# ----------------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------------


@torch.inference_mode()
def generate(model: Llama, prompt_ids: Union[torch.Tensor, Sequence[torch.Tensor]], max_new_tokens: int, *, temperature: float = 0.8,
             top_k: Optional[int] = None, top_p: Optional[float] = None, eos_id: Union[int, Sequence[int], None] = None,
             on_token: Optional[Callable[[torch.Tensor], None]] = None,
             generator: Optional[torch.Generator] = None, cache_length: Optional[int] = None,
             cached: Optional[int] = None) -> Union[torch.Tensor, List[torch.Tensor]]:
    """Continue `prompt_ids` by up to `max_new_tokens` tokens; returns the prompt followed by the new ids.

    prompt_ids: (T,) for one prompt, (B, T) for a batch of prompts of equal length (the result has the same
        number of dimensions), or a list of (T_i,) prompts of any lengths, generated as one batch: each is
        left-padded to the longest, and the model skips the padding (`left_pad`, see `Llama.forward`), so
        every row computes what its prompt alone would. The result is then a list: each prompt followed
        by its new ids, up to and including its own EOS.

            [pad pad p p p | n n n EOS ...]    row 0: positions 0 1 2 | 3 4 5 6    (the pads are skipped)
            [p   p   p p p | n n n n   ...]    row 1: positions 0 1 2 3 4 | 5 6 ...
    temperature, top_k, top_p: see `sample_next_token`; temperature=0 is greedy decoding.
    eos_id: stop once every sequence has produced it, or any of several stop ids (`Tokenizer.stop_ids`:
        Llama 3 ends a chat answer with <|eot_id|>, a text with <|end_of_text|>). The stop token is included
        in the output; in a batch, sequences that finished early are padded with the first stop id.
        None: always max_new_tokens.
    on_token: called after every step with that step's new ids, (B,): streaming, timing.
    generator: a seeded torch.Generator for reproducible sampling (else the global RNG).
    cache_length: positions to allocate in the KV cache; default just enough for this call (prompt +
        max_new_tokens, within block_size). A compiled model wants the same length on every call.
    cached: continue a conversation (generate/chat.py): the KV cache the caller set with
        `model.set_kv_cache` already holds the first `cached` tokens of `prompt_ids`, so only the rest is
        prefilled, and the cache stays when the call returns (it then holds every token but the last).

    Generation stops at the end of the model's context (block_size) if that comes first. The model
    should be in eval mode (dropout off). Unless `cached` is given, a KV cache (sized for this call, or
    `cache_length`) is allocated for the call and removed when it returns (a cache the model had before
    is replaced).
    """
    check_generation_settings(max_new_tokens, temperature, top_k, top_p)
    device = model.tok_embeddings.weight.device
    left_pad = None
    if isinstance(prompt_ids, (list, tuple)):  # prompts of different lengths: left-pad them into one batch
        if not prompt_ids or any(p.dim() != 1 or p.numel() == 0 for p in prompt_ids) or cached is not None:
            raise ValueError("a list of prompts must hold non-empty (T,) tensors of token ids (and cannot continue a cache)")
        lengths = torch.tensor([len(p) for p in prompt_ids], device=device)
        left_pad = int(lengths.max()) - lengths  # (B,)
        prompt = torch.zeros(len(prompt_ids), int(lengths.max()), dtype=torch.long, device=device)  # (B, T)
        for row, ids in enumerate(prompt_ids):
            prompt[row, int(left_pad[row]):] = ids
    elif prompt_ids.dim() not in (1, 2) or prompt_ids.size(-1) == 0:
        raise ValueError(f"prompt_ids must be a non-empty (T,) or (B, T) tensor of token ids, got shape {tuple(prompt_ids.shape)}")
    else:
        prompt = (prompt_ids if prompt_ids.dim() == 2 else prompt_ids[None]).to(device)  # (B, T)
    B, T = prompt.shape
    block_size = model.config.block_size
    check_prompt_fits(T, block_size)
    total = min(T + max_new_tokens, block_size)  # prompt plus everything that will be generated

    tokens = torch.empty(B, total, dtype=torch.long, device=device)  # filled left to right, never reallocated
    tokens[:, :T] = prompt
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    stop_ids = None if eos_id is None else torch.tensor(eos_id, device=device).reshape(-1)  # (n_stop,)
    start = cached or 0
    if cached is None:
        model.set_kv_cache(batch_size=B, max_seq_length=max(total, cache_length or 0), device=device)
    else:  # checked before anything is fed to the model
        cache = model.layers[0].attn.kv_cache
        if cache is None or cache_length is not None or cache.k.size(0) < B or cache.k.size(2) < total:
            raise ValueError("cached=... continues the KV cache the caller set with model.set_kv_cache: it must exist, "
                             f"hold {B} rows and {total} positions (cache_length is then the cache's own)")
        if not 0 <= cached < T:
            raise ValueError(f"cached={cached}: the KV cache must hold a part of the prompt ({T} tokens) short of its end")
    try:
        # Prefill: the prompt (what the cache does not hold yet) in one forward pass fills the cache;
        # only the last position's logits matter, they score the first new token.
        logits = model(tokens[:, start:T], torch.arange(start, T, device=device), left_pad=left_pad)[:, -1]  # (B, V)
        check_finite_logits(logits)  # once per call, not per token: the decoding loop waits for nothing more
        length = T
        input_pos = torch.tensor([T], device=device)  # where the next token goes; advanced in place
        while length < total:
            next_ids = sample_next_token(logits, temperature, top_k, top_p, generator)  # (B,)
            if stop_ids is not None:
                next_ids = next_ids.masked_fill(finished, stop_ids[0])  # finished sequences only pad
                finished |= torch.isin(next_ids, stop_ids)
            tokens[:, length] = next_ids
            length += 1
            if on_token is not None:
                on_token(next_ids)
            if length == total or (eos_id is not None and bool(finished.all())):
                break
            # Decode: one token per sequence; it attends to the cache and appends its key/value.
            logits = model(next_ids[:, None], input_pos, left_pad=left_pad)[:, -1]  # (B, 1, V) -> (B, V)
            input_pos += 1
    finally:
        if cached is None:
            model.clear_kv_cache()
    if left_pad is not None:  # each prompt without its padding, and its answer up to its own EOS
        return [row[int(pad):length][: own_length(row[int(pad):length], len(ids), eos_id)]
                for row, pad, ids in zip(tokens, left_pad, prompt_ids)]
    return tokens[:, :length] if prompt_ids.dim() == 2 else tokens[0, :length]


class NonFiniteLogits(ValueError):
    """The model scored the next token with NaN or infinite logits: its weights overflow in this dtype."""


def check_finite_logits(logits: torch.Tensor) -> None:
    """A `NonFiniteLogits` error unless every logit is finite. Weights that are finite in their file can
    still overflow once multiplied (a huge LoRA update, a large weight in float16): greedy decoding would
    then print garbage and sampling fail deep inside torch.multinomial."""
    if not bool(torch.isfinite(logits).all()):
        raise NonFiniteLogits("the model's logits are NaN or infinite: its weights overflow when used (in float16, "
                              "--dtype float32 may help) or are damaged")


def own_length(ids: torch.Tensor, prompt_length: int, eos_id: Union[int, Sequence[int], None]) -> int:
    """How many of `ids` (a prompt and its generated ids) belong to this row: up to its first new stop id."""
    if eos_id is not None:
        ends = torch.isin(ids[prompt_length:], torch.tensor(eos_id, device=ids.device)).nonzero()
        if len(ends):
            return prompt_length + int(ends[0]) + 1
    return len(ids)


def check_prompt_fits(prompt_length: int, block_size: int) -> None:
    """A one-line error when a prompt leaves no room for even one new token in the model's context."""
    if prompt_length >= block_size:
        raise ValueError(f"the prompt is {prompt_length} tokens long, but the model's context holds {block_size} "
                         "tokens including the answer: shorten the prompt")
