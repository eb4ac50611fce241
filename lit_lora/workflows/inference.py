"""What the generate/*.py scripts share around `generate`: choosing the device and dtype, checking the
request before any weight is read, loading (optionally quantized), applying adapters one after another,
streaming the text as it is produced, and timing it. The lesson itself is lit_lora/generate.py.
"""

import json
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, TextIO, Tuple, Union

import torch

from lit_lora.files.checkpoint import WEIGHTS_NAME, check_same_base, load_checkpoint, load_config
from lit_lora.files.utils import DTYPES, PathLike, parse_dtype, peak_memory
from lit_lora.generate import NonFiniteLogits, check_prompt_fits, generate
from lit_lora.lora import is_quantized
from lit_lora.methods import MethodWeights, apply_weights, get_method, read_weights, take_off
from lit_lora.model import Llama
from lit_lora.prompts import get_prompt_style
from lit_lora.speed.decoding import compile_for_decoding, cpu_supports_fast_bf16
from lit_lora.speed.quantize import load_checkpoint_quantized
from lit_lora.tokenizer import Tokenizer


DEFAULT_PROMPT_STYLE = "alpaca"  # for adapters written before files recorded their prompt style
NOT_COMPILED_IN_BATCHES = "note: --compile applies to one prompt at a time; a file of prompts is generated eagerly"


def decode_new(tokenizer: Tokenizer, new_ids: List[int], prompt_ids: Optional[torch.Tensor] = None) -> str:
    """The text of `new_ids`, decoded behind the last token of `prompt_ids` (when given) so that the space
    joining it to the prompt stays: SentencePiece drops a leading space from the start of decoded text."""
    context = [] if prompt_ids is None or prompt_ids.numel() == 0 else [int(prompt_ids.reshape(-1)[-1])]
    return tokenizer.decode(context + list(new_ids))[len(tokenizer.decode(context)):]


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
        self.tokenizer, self.prompt_ids = tokenizer, prompt_ids
        self.generated: List[int] = []
        self.printed = ""
        self.file = file

    def text(self) -> str:
        """The generated text so far (with the space that joins it to the prompt, if any)."""
        return decode_new(self.tokenizer, self.generated, self.prompt_ids)

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
# Device, dtype, checks and loading
# ----------------------------------------------------------------------------------------------------


def choose_device(device: str = "auto") -> torch.device:
    """"auto" is the first CUDA GPU when there is one, else the CPU; anything else is taken as given."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if chosen.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {device!r}: lit-lora generates on cpu or cuda")
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: this machine has no CUDA GPU (use --device cpu)")
    return chosen


def choose_dtype(device: torch.device, dtype: str = "auto") -> torch.dtype:
    """"auto": bf16 on GPUs that support it (float16 on older ones); on a CPU bf16 where it has native
    bf16 instructions (half the memory, and decoding streams half the bytes), else float32."""
    if dtype != "auto":
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose auto, {', '.join(DTYPES)}")
        return parse_dtype(dtype)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_supports_fast_bf16() else torch.float32


def encode_prompts(checkpoint_dir: PathLike, prompts: Sequence[str], max_new_tokens: int) -> Tuple[Tokenizer, List[torch.Tensor]]:
    """The tokenizer beside the weights and the ids of each prompt, checked against the model's config
    before any weight is read: a prompt that is too long fails in a second with a one-line error, not after
    loading 13 GB. A note goes to stderr if an answer will be cut short by the end of the context."""
    config = load_config(checkpoint_dir)
    tokenizer = Tokenizer(checkpoint_dir)
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"{tokenizer.model_path} has {tokenizer.vocab_size} pieces but the model in {checkpoint_dir} "
                         f"knows only {config.vocab_size} tokens: use the tokenizer the model was trained with")
    encoded = []
    for prompt in prompts:
        prompt_ids = tokenizer.encode(prompt, bos=True)
        check_prompt_fits(len(prompt_ids), config.block_size)
        if len(prompt_ids) + max_new_tokens > config.block_size:
            print(f"note: the prompt is {len(prompt_ids)} tokens long, so at most {config.block_size - len(prompt_ids)} "
                  f"new tokens fit the context of {config.block_size} (asked for {max_new_tokens})", file=sys.stderr)
        encoded.append(prompt_ids)
    return tokenizer, encoded


def load_for_generation(checkpoint_dir: PathLike, device: str = "auto", dtype: str = "auto",
                        quantize: Optional[str] = None) -> Llama:
    """The model of a lit-lora checkpoint directory in eval mode on the chosen device and dtype, its linear
    layers quantized with `quantize` (a scheme of lit_lora/speed/quantize.py: nf4, nf4-dq or int8)."""
    chosen_device = choose_device(device)
    chosen_dtype = choose_dtype(chosen_device, dtype)
    if quantize is None:
        model = load_checkpoint(checkpoint_dir, dtype=chosen_dtype, device=chosen_device).eval()
    else:
        model = load_checkpoint_quantized(checkpoint_dir, mode=quantize, dtype=chosen_dtype, device=chosen_device).eval()
        if quantize == "int8" and chosen_device.type != "cpu":
            print("note: int8 layers decode fast only on a CPU; here they dequantize their weights at every call: "
                  "less memory, slower decoding", file=sys.stderr)
    print(f"loaded {checkpoint_dir} on {chosen_device} in {str(chosen_dtype).removeprefix('torch.')}"
          + (f", linear layers in {quantize}" if quantize else ""), file=sys.stderr)
    return model


def apply_adapter_file(model: Llama, lora_path: Optional[PathLike] = None, adapter_path: Optional[PathLike] = None,
                       merge: bool = True) -> Optional[MethodWeights]:
    """Apply the LoRA (or DoRA) file or the LLaMA-Adapter file a script was given, if any, merging a LoRA
    update into the weights when asked and possible (not into a quantized base). Returns the file as read."""
    if lora_path is not None and adapter_path is not None:
        raise ValueError("give --lora_path or --adapter_path, not both")
    path = lora_path if lora_path is not None else adapter_path
    if path is None:
        return None
    weights = apply_weights(model, path, "lora" if lora_path is not None else "adapter")
    if merge and weights.method.merge is not None and not any(is_quantized(m) for m in model.modules()):
        weights.method.merge(model)
    return weights


@contextmanager
def blame_weights(checkpoint_dir: PathLike, *adapter_paths: Optional[PathLike]) -> Iterator[None]:
    """For the block: NaN or infinite logits (`generate.NonFiniteLogits`) become a one-line error that names
    the weights files the model was loaded from."""
    try:
        yield
    except NonFiniteLogits as error:
        files = [Path(checkpoint_dir) / WEIGHTS_NAME, *(Path(p) for p in adapter_paths if p is not None)]
        raise NonFiniteLogits(f"{' + '.join(map(str, files))}: {error}") from None


# ----------------------------------------------------------------------------------------------------
# Streaming and timing one answer
# ----------------------------------------------------------------------------------------------------


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

    compile: decode with `speed.compile_for_decoding(model, prompt_ids)` (timed and reported apart).
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
        cache_length = min(prompt_ids.size(-1) + max_new_tokens, model.config.block_size)
        runner = compile_for_decoding(model, prompt_ids, cache_length)
        print(f"compiled in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    print(echo, end="", file=file or sys.stdout, flush=True)
    start = time.perf_counter()
    output = generate(runner, prompt_ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                      eos_id=tokenizer.stop_ids, on_token=on_token, cache_length=cache_length)
    seconds = time.perf_counter() - start
    text = streamer.finish()
    new_tokens = output.size(-1) - prompt_ids.size(-1)
    stats = GenerationStats(prompt_tokens=prompt_ids.size(-1), new_tokens=new_tokens,
                            time_to_first_token=(first_token_time or [start + seconds])[0] - start,
                            seconds=seconds, peak_memory=peak_memory(device))
    return text, stats


def read_prompts_file(path: PathLike) -> List[str]:
    """The prompts of a file: a JSON list of strings (`.json`, for prompts spanning lines), else one prompt per
    non-empty line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            prompts = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON ({error}): give a list of strings, or a text file with one prompt per line") from None
        if not isinstance(prompts, list) or not all(isinstance(p, str) and p for p in prompts):
            raise ValueError(f"{path} must hold a JSON list of non-empty strings, one per prompt")
    else:
        prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"{path} holds no prompt")
    return prompts


def generate_batches(model: Llama, tokenizer: Tokenizer, prompts: Sequence[torch.Tensor], max_new_tokens: int, *,
                     batch_size: int = 8, temperature: float = 0.8, top_k: Optional[int] = None,
                     top_p: Optional[float] = None, continuation: bool = False,
                     file: Optional[TextIO] = None) -> Tuple[List[str], str]:
    """Answer many prompts, `batch_size` at a time (`generate` with a list: left padding, each row stopping
    at its own EOS); every answer is printed to `file` (stdout) under a `### prompt N` line, in the
    prompts' order, as soon as it and those before it are done. Prompts of similar length share a batch
    (less padding); the answers come back in the prompts' order. `continuation`: as in `generate_streaming` (the answer keeps the space joining it to the prompt).
    Returns (the answers, a line of statistics)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers: Dict[int, str] = {}
    start, new_tokens, printed = time.perf_counter(), 0, 0
    for first in range(0, len(order), batch_size):
        chunk = order[first:first + batch_size]
        outputs = generate(model, [prompts[i] for i in chunk], max_new_tokens, temperature=temperature, top_k=top_k,
                           top_p=top_p, eos_id=tokenizer.stop_ids)
        for i, ids in zip(chunk, outputs):
            new = ids[len(prompts[i]):].tolist()
            new_tokens += len(new)
            answers[i] = decode_new(tokenizer, new[:-1] if new and new[-1] in tokenizer.stop_ids else new,
                                    prompts[i] if continuation else None)
        while printed in answers:  # in the file's order: each answer as soon as those before it are printed
            print(f"### prompt {printed + 1}\n{answers[printed]}", file=file or sys.stdout, flush=True)
            printed += 1
    seconds = time.perf_counter() - start
    stats = (f"{len(prompts)} prompts in batches of up to {batch_size}: {new_tokens} new tokens in {seconds:.2f} s, "
             f"{new_tokens / seconds:.1f} tokens/s; {peak_memory(model.tok_embeddings.weight.device)}")
    return [answers[i] for i in range(len(prompts))], stats


# ----------------------------------------------------------------------------------------------------
# One base, several adapters
# ----------------------------------------------------------------------------------------------------


def answer_with_each(checkpoint_dir: PathLike, paths: Sequence[PathLike], method: str, instructions: Union[str, Sequence[str]],
                     input: str = "", prompt_style: Optional[str] = None, merge: bool = False,
                     max_new_tokens: int = 100, temperature: float = 0.8, top_k: Optional[int] = None,
                     top_p: Optional[float] = None, seed: int = 1234, device: str = "auto", dtype: str = "auto",
                     quantize: Optional[str] = None, compile: bool = False, batch_size: int = 8) -> List[str]:
    """Answer the instruction (or each of several `instructions`, `batch_size` at a time: `generate_batches`)
    with the base checkpoint plus each weights file of `method` in turn; returns the answers, file by file.
    The base weights are loaded once; each file is applied (and merged, if asked and the method merges),
    answers, and is taken off again before the next.

    Each answer is prompted in the style its file was trained with unless `prompt_style` says otherwise.
    Every file and every prompt is checked before the weights are read. Only the answers go to stdout
    (under a `### <file>` line each when there are several); settings, timing and memory go to stderr."""
    found = get_method(method)
    if not paths:
        raise ValueError(f"no {found.name} weights file given")
    headers = [read_weights(path, found) for path in paths]  # a wrong or corrupt file fails before loading
    base_config = load_config(checkpoint_dir)
    for path, header in zip(paths, headers):
        check_same_base(str(path), header.model_config, base_config)
    styles = [get_prompt_style(prompt_style or header.prompt_style or DEFAULT_PROMPT_STYLE) for header in headers]
    instructions = [instructions] if isinstance(instructions, str) else list(instructions)
    tokenizer, prompts = encode_prompts(checkpoint_dir, [style.format(instruction, input) for style in styles
                                                         for instruction in instructions], max_new_tokens)
    model = load_for_generation(checkpoint_dir, device, dtype, quantize)
    if merge and (found.merge is None or quantize is not None):
        print(f"note: the {found.name} update stays separate from the base weights ("
              + ("a quantized base cannot absorb it in place; scripts/merge_lora.py merges into a 16-bit copy)"
                 if found.merge is not None else "this method has nothing to merge)"), file=sys.stderr)
        merge = False
    answers = []
    for index, (path, style) in enumerate(zip(paths, styles)):
        file_prompts = prompts[index * len(instructions):(index + 1) * len(instructions)]
        weights = apply_weights(model, path, found)
        if merge:
            found.merge(model)
        print(f"{path}: {found.name} {weights.config}, prompt style {style.name}"
              + (", merged into the weights" if merge else ""), file=sys.stderr)
        if len(paths) > 1:
            print(f"### {path}", flush=True)
        torch.manual_seed(seed)
        with blame_weights(checkpoint_dir, path):
            if len(file_prompts) == 1:
                answer, stats = generate_streaming(model, tokenizer, file_prompts[0], max_new_tokens,
                                                   temperature=temperature, top_k=top_k, top_p=top_p, continuation=False,
                                                   compile=compile)
                answers.append(answer)
            else:
                if compile:
                    print(NOT_COMPILED_IN_BATCHES, file=sys.stderr)
                batch_answers, stats = generate_batches(model, tokenizer, file_prompts, max_new_tokens,
                                                        batch_size=batch_size, temperature=temperature, top_k=top_k,
                                                        top_p=top_p)
                answers += batch_answers
        print(stats, file=sys.stderr)
        take_off(model, found)
    return answers
