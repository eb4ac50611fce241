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

The second half of this file is the plumbing the generate/*.py scripts share: device and dtype
choice, loading, prompt checks, streaming text to stdout and the timing summary on stderr.
"""

import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, TextIO, Tuple, Union

import torch

from lit_lora.checkpoint import TOKENIZER_NAME, load_checkpoint, load_config
from lit_lora.model import Llama
from lit_lora.quantize import load_checkpoint_quantized
from lit_lora.tokenizer import Tokenizer
from lit_lora.utils import peak_memory

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


def check_generation_settings(max_new_tokens: int, temperature: float, top_k: Optional[int], top_p: Optional[float]) -> None:
    """One-line errors for settings `generate` cannot use (the scripts check them before loading a model)."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be a positive integer, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


# ----------------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------------


@torch.inference_mode()
def generate(model: Llama, prompt_ids: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.8,
             top_k: Optional[int] = None, top_p: Optional[float] = None, eos_id: Optional[int] = None,
             on_token: Optional[Callable[[torch.Tensor], None]] = None,
             generator: Optional[torch.Generator] = None, cache_length: Optional[int] = None) -> torch.Tensor:
    """Continue `prompt_ids` by up to `max_new_tokens` tokens; returns the prompt followed by the new ids.

    prompt_ids: (T,) for one prompt, or (B, T) for a batch of prompts of equal length (the model has no
        padding mask, so prompts of different lengths must be generated separately). The result has the
        same number of dimensions.
    temperature, top_k, top_p: see `sample_next_token`; temperature=0 is greedy decoding.
    eos_id: stop once every sequence has produced it. The EOS token is included in the output; in a
        batch, sequences that finished early are padded with eos_id. None: always max_new_tokens.
    on_token: called after every step with that step's new ids, (B,): streaming, timing.
    generator: a seeded torch.Generator for reproducible sampling (else the global RNG).
    cache_length: positions to allocate in the KV cache; default just enough for this call (prompt +
        max_new_tokens, within block_size). A compiled model wants the same length on every call.

    Generation stops at the end of the model's context (block_size) if that comes first. The model
    should be in eval mode (dropout off). A KV cache (sized for this call, or `cache_length`) is
    allocated and removed again when it returns, so the model is left as it was found.
    """
    check_generation_settings(max_new_tokens, temperature, top_k, top_p)
    batched = prompt_ids.dim() == 2
    if prompt_ids.dim() not in (1, 2) or prompt_ids.size(-1) == 0:
        raise ValueError(f"prompt_ids must be a non-empty (T,) or (B, T) tensor of token ids, got shape {tuple(prompt_ids.shape)}")
    device = model.tok_embeddings.weight.device
    prompt = (prompt_ids if batched else prompt_ids[None]).to(device)  # (B, T)
    B, T = prompt.shape
    block_size = model.config.block_size
    check_prompt_fits(T, block_size)
    total = min(T + max_new_tokens, block_size)  # prompt plus everything that will be generated

    tokens = torch.empty(B, total, dtype=torch.long, device=device)  # filled left to right, never reallocated
    tokens[:, :T] = prompt
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    model.set_kv_cache(batch_size=B, max_seq_length=max(total, cache_length or 0), device=device)
    try:
        # Prefill: the whole prompt in one forward pass fills the cache; only the last position's
        # logits matter, they score the first new token.
        logits = model(tokens[:, :T], torch.arange(T, device=device))[:, -1]  # (B, V)
        length = T
        input_pos = torch.tensor([T], device=device)  # where the next token goes; advanced in place
        while length < total:
            next_ids = sample_next_token(logits, temperature, top_k, top_p, generator)  # (B,)
            if eos_id is not None:
                next_ids = next_ids.masked_fill(finished, eos_id)  # finished sequences only pad
                finished |= next_ids == eos_id
            tokens[:, length] = next_ids
            length += 1
            if on_token is not None:
                on_token(next_ids)
            if length == total or (eos_id is not None and bool(finished.all())):
                break
            # Decode: one token per sequence; it attends to the cache and appends its key/value.
            logits = model(next_ids[:, None], input_pos)[:, -1]  # (B, 1, V) -> (B, V)
            input_pos += 1
    finally:
        model.clear_kv_cache()
    return tokens[:, :length] if batched else tokens[0, :length]


def check_prompt_fits(prompt_length: int, block_size: int) -> None:
    """A one-line error when a prompt leaves no room for even one new token in the model's context."""
    if prompt_length >= block_size:
        raise ValueError(f"the prompt is {prompt_length} tokens long, but the model's context holds {block_size} "
                         "tokens including the answer: shorten the prompt")


# ----------------------------------------------------------------------------------------------------
# Streaming text
# ----------------------------------------------------------------------------------------------------


class TextStreamer:
    """An `on_token` callback that prints the generated text as it is produced (one sequence).

    SentencePiece marks a word's leading space inside the piece ("▁world") and drops it when a piece
    starts the decoded text, so decoding token by token would glue words together ("Helloworld").
    Instead the whole generated sequence is decoded after each step, behind the last prompt token as
    context, and only the part not printed yet is written. A character made of several byte pieces
    (byte fallback, e.g. emoji) decodes to U+FFFD until its last byte arrives, so text ending in U+FFFD
    is held back. Decoding the whole sequence each step costs O(n) per token, negligible next to a
    forward pass.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Optional[torch.Tensor] = None,
                 file: Optional[TextIO] = None) -> None:
        self.tokenizer = tokenizer
        self.context = [] if prompt_ids is None or prompt_ids.numel() == 0 else [int(prompt_ids.reshape(-1)[-1])]
        self.context_text = tokenizer.decode(self.context)
        self.generated: List[int] = []
        self.printed = ""
        self.file = file

    def text(self) -> str:
        """The generated text so far (with the space that joins it to the prompt, if any)."""
        return self.tokenizer.decode(self.context + self.generated)[len(self.context_text):]

    def __call__(self, next_ids: torch.Tensor) -> None:
        if next_ids.numel() != 1:
            raise ValueError("TextStreamer prints one sequence: generate a batch without it")
        self.generated.append(int(next_ids.reshape(-1)[0]))
        text = self.text()
        if not text.endswith("\ufffd"):  # a multi-byte character still incomplete: wait for its last byte
            self._write(text)

    def finish(self) -> str:
        """Print what is still held back and a final newline; returns the whole generated text."""
        text = self.text()
        self._write(text)
        print(file=self.file or sys.stdout, flush=True)
        return text

    def _write(self, text: str) -> None:
        new = text[len(self.printed):]  # decoding more tokens only ever appends to the text printed so far
        if new:
            print(new, end="", file=self.file or sys.stdout, flush=True)
        self.printed = text


# ----------------------------------------------------------------------------------------------------
# Plumbing shared by generate/base.py, generate/lora.py and generate/adapter.py
# ----------------------------------------------------------------------------------------------------


def cpu_supports_fast_bf16() -> bool:
    """Whether this CPU has native bf16 arithmetic (AVX512-BF16 or AMX), asked at run time: without
    it, bf16 matrix products are emulated and slower than float32."""
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        check = getattr(torch.cpu, probe, None)  # private helpers of torch.cpu; absent in some builds
        if check is not None and check():
            return True
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def choose_device(device: str = "auto") -> torch.device:
    """"auto" is the first CUDA GPU when there is one, else the CPU; anything else is taken as given."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    chosen = torch.device(device)
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: this machine has no CUDA GPU (use --device cpu)")
    return chosen


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def choose_dtype(device: torch.device, dtype: str = "auto") -> torch.dtype:
    """"auto": bf16 on GPUs that support it (float16 on older ones); on a CPU bf16 where it has native
    bf16 instructions (half the memory, and decoding streams half the bytes), else float32."""
    if dtype != "auto":
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose auto, {', '.join(DTYPES)}")
        return DTYPES[dtype]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_supports_fast_bf16() else torch.float32


def load_for_generation(checkpoint_dir: Union[str, Path], prompt: str, max_new_tokens: int, device: str = "auto",
                        dtype: str = "auto", quantize: Optional[str] = None) -> Tuple[Llama, Tokenizer, torch.Tensor]:
    """(model, tokenizer, prompt ids) for a lit-lora checkpoint directory: the tokenizer is
    `tokenizer.model` beside the weights; the model is in eval mode on the chosen device and dtype,
    its linear layers quantized with `quantize`: "nf4" or "nf4-dq" (4 bits, QLoRA's format) or "int8"
    (8 bits, output head included), see lit_lora/quantize.py.

    Everything that can be wrong with the request is checked before the weights are read, so a prompt
    that is too long fails in a second with a one-line error, not after loading 13 GB. A note goes to
    stderr if the answer will be cut short by the end of the context."""
    chosen_device = choose_device(device)
    chosen_dtype = choose_dtype(chosen_device, dtype)
    config = load_config(checkpoint_dir)
    tokenizer = Tokenizer(Path(checkpoint_dir) / TOKENIZER_NAME)
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"{tokenizer.model_path} has {tokenizer.vocab_size} pieces but the model in {checkpoint_dir} "
                         f"knows only {config.vocab_size} tokens: use the tokenizer the model was trained with")
    prompt_ids = tokenizer.encode(prompt, bos=True)
    check_prompt_fits(len(prompt_ids), config.block_size)
    if len(prompt_ids) + max_new_tokens > config.block_size:
        print(f"note: the prompt is {len(prompt_ids)} tokens long, so at most {config.block_size - len(prompt_ids)} new "
              f"tokens fit the context of {config.block_size} (asked for {max_new_tokens})", file=sys.stderr)

    if quantize is None:
        model = load_checkpoint(checkpoint_dir, dtype=chosen_dtype, device=chosen_device).eval()
    else:
        # QLoRA keeps the head in 16 bits; int8 decoding quantizes it too: it is the largest matrix read per
        # token (39 % of the weights a 60M model with a 32k vocabulary reads).
        skip = ("lm_head",) if quantize != "int8" else ()
        model = load_checkpoint_quantized(checkpoint_dir, mode=quantize, dtype=chosen_dtype, device=chosen_device, skip=skip).eval()
        if quantize == "int8" and (chosen_dtype != torch.bfloat16 or chosen_device.type != "cpu"):
            print("note: int8 layers decode fast only on a CPU with native bf16, in bfloat16 (--dtype bfloat16); "
                  "here they dequantize their weights at every call: less memory, slower decoding", file=sys.stderr)
    print(f"loaded {checkpoint_dir} on {chosen_device} in {str(chosen_dtype).removeprefix('torch.')}"
          + (f", linear layers in {quantize}" if quantize else ""), file=sys.stderr)
    return model, tokenizer, prompt_ids


def compile_for_decoding(model: Llama, prompt_ids: torch.Tensor) -> Callable[..., torch.Tensor]:
    """`torch.compile` (inductor) the model for `generate(..., cache_length=model.config.block_size)`,
    and compile it now with a 3-token warm-up on `prompt_ids`. Returns the compiled model.

    Why: decoding a small model on a CPU spends about half of each token in the Python and dispatch
    overhead of ~20 small operations per layer (norms, RoPE, cache writes); compiled, they become a few
    fused kernels. Costs: 10-60 s of compiling, again for every new adapter (the compiled code is only
    valid for the modules it saw), and a KV cache for the whole context on every call (one shape, so no
    recompiling: 2 GB for Llama-2-7B's 4096 positions in bf16). A CPU needs a C++ compiler.
    """
    torch.compiler.reset()  # the previous adapter's graphs are useless and count against dynamo's recompile limit
    compiled = torch.compile(model, dynamic=True)  # dynamic: the cache fills by one position every step
    graph_breaks = logging.getLogger("torch._dynamo.variables.tensor")
    level = graph_breaks.level
    graph_breaks.setLevel(logging.ERROR)  # the graph break at int(input_pos[-1]) (the cache's fill) is expected
    try:
        generate(compiled, prompt_ids, 3, temperature=0.0, cache_length=model.config.block_size)  # prefill and decoding
    except Exception as error:  # inductor's failures are pages of traceback from deep inside torch
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise ValueError(f"compiling the model failed ({type(error).__name__}: {first_line}); run without --compile "
                         "(on a CPU it needs a working C++ compiler)") from error
    finally:
        graph_breaks.setLevel(level)
    return compiled


@dataclass
class GenerationStats:
    prompt_tokens: int
    new_tokens: int
    time_to_first_token: float  # seconds from the call to the first new token: the prefill
    seconds: float  # the whole call
    peak_memory: str

    @property
    def tokens_per_second(self) -> float:
        """Decoding speed: the tokens after the first, over the time after the first."""
        decode_seconds = self.seconds - self.time_to_first_token
        return (self.new_tokens - 1) / decode_seconds if self.new_tokens > 1 and decode_seconds > 0 else float("nan")

    def __str__(self) -> str:
        return (f"time to first token {self.time_to_first_token:.3f} s; {self.new_tokens} new tokens in "
                f"{self.seconds:.2f} s, {self.tokens_per_second:.1f} tokens/s after the first; {self.peak_memory}")


def generate_streaming(model: Llama, tokenizer: Tokenizer, prompt_ids: torch.Tensor, max_new_tokens: int, *,
                       temperature: float = 0.8, top_k: Optional[int] = None, top_p: Optional[float] = None,
                       continuation: bool = True, compile: bool = False, echo: str = "",
                       file: Optional[TextIO] = None) -> Tuple[str, GenerationStats]:
    """`generate` one prompt until EOS, printing the new text to `file` (stdout) as it is produced and
    timing it. Returns (the new text, its statistics); the scripts print the statistics on stderr.

    continuation: the text continues the prompt, and keeps the space that joins it to the prompt's last
    word. False for a response to an instruction template: decoded on its own, it starts at its first
    word (see lit_lora/prompts.py).

    compile: decode with `compile_for_decoding(model, prompt_ids)` (timed and reported apart).
    echo: text printed just before the generated text (e.g. the prompt), after any compiling."""
    device = model.tok_embeddings.weight.device
    streamer = TextStreamer(tokenizer, prompt_ids if continuation else None, file)
    first_token_time: List[float] = []

    def on_token(next_ids: torch.Tensor) -> None:
        streamer(next_ids)  # int() of the id waits for the device, so the clock below is honest on GPUs
        if not first_token_time:
            first_token_time.append(time.perf_counter())

    runner, cache_length = model, None
    if compile:
        started = time.perf_counter()
        runner, cache_length = compile_for_decoding(model, prompt_ids), model.config.block_size
        print(f"compiled in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    print(echo, end="", file=file or sys.stdout, flush=True)
    start = time.perf_counter()
    output = generate(runner, prompt_ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                      eos_id=tokenizer.eos_id, on_token=on_token, cache_length=cache_length)
    seconds = time.perf_counter() - start
    text = streamer.finish()
    new_tokens = output.size(-1) - prompt_ids.size(-1)
    stats = GenerationStats(prompt_tokens=prompt_ids.size(-1), new_tokens=new_tokens,
                            time_to_first_token=(first_token_time or [start + seconds])[0] - start,
                            seconds=seconds, peak_memory=peak_memory(device))
    return text, stats
