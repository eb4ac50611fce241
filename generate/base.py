"""Step 5: continue a prompt with a base model (no adapter): plain text completion.

    python generate/base.py --checkpoint_dir checkpoints/meta-llama/Llama-2-7b-hf --prompt "The capital of France is"

The prompt and its continuation go to stdout as they are produced; timing and memory go to stderr.
See howto/inference.md.
"""

import sys
from pathlib import Path
from typing import List, Literal, Optional, Union

import torch

from lit_lora.files.checkpoint import recorded_prompt_style
from lit_lora.generate import check_generation_settings
from lit_lora.prompts import get_prompt_style
from lit_lora.speed.quantize import QuantizeMode
from lit_lora.workflows.cli import run
from lit_lora.workflows.inference import (NOT_COMPILED_IN_BATCHES, blame_weights, encode_prompts, generate_batches,
                                          generate_streaming, load_for_generation, read_prompts_file)


def main(
    checkpoint_dir: Path = Path("checkpoints/meta-llama/Llama-2-7b-hf"),
    prompt: str = "Hello, my name is",
    max_new_tokens: int = 100,
    temperature: float = 0.8,
    top_k: Optional[int] = 200,
    top_p: Optional[float] = None,
    seed: int = 1234,
    device: str = "auto",
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto",
    quantize: Optional[QuantizeMode] = None,
    compile: bool = False,
    prompts_file: Optional[Path] = None,
    batch_size: int = 8,
    prompt_style: Optional[str] = None,
) -> Union[str, List[str]]:
    """Generate a continuation of `prompt` with a lit-lora checkpoint.

    Args:
        checkpoint_dir: the model (lit_model.safetensors, model_config.json, tokenizer.model or tokenizer.json).
        prompt: the text to continue.
        max_new_tokens: the most tokens to generate (fewer if the model emits EOS or the context ends).
        temperature: 0 is greedy decoding; below 1 sharper, above 1 more random.
        top_k: sample only among the k most likely tokens (null: all).
        top_p: sample only among the most likely tokens whose probability reaches p (nucleus sampling).
        seed: random seed, for reproducible sampling.
        device: "auto" (a CUDA GPU if there is one), "cpu", "cuda" or "cuda:N".
        dtype: "auto" is bf16 on GPUs that support it and on CPUs with native bf16 (AVX512-BF16/AMX), else float32.
        quantize: keep the linear layers in 4 bits, "nf4" or "nf4-dq" (QLoRA; see howto/finetune_qlora.md), or
            in 8 bits, "int8": the fastest decoding on a CPU with native bf16 (see howto/inference.md).
        compile: torch.compile the model before generating: faster decoding after 10-60 s of compiling (one prompt).
        prompts_file: continue every prompt of this file instead (one per line, or a JSON list of strings),
            `batch_size` at a time in one batch each; the answers go to stdout under `### prompt N` lines.
        batch_size: prompts generated together with --prompts_file.
        prompt_style: lay each prompt out in this instruction template (lit_lora/prompts.py) and print only the
            answer; default: the style a merged or fully finetuned checkpoint records in its training.json,
            else none (plain continuation). "none" continues the prompt as it is.
    """
    check_generation_settings(max_new_tokens, temperature, top_k, top_p)
    torch.manual_seed(seed)
    style_name = prompt_style or recorded_prompt_style(checkpoint_dir)
    style = None if style_name in (None, "none") else get_prompt_style(style_name)
    if style is not None and prompt_style is None:
        print(f"note: {checkpoint_dir} was finetuned with the {style.name!r} prompt style: each prompt is laid out in it "
              "(--prompt_style none continues the text as it is)", file=sys.stderr)
    texts = read_prompts_file(prompts_file) if prompts_file is not None else [prompt]
    formatted = [style.format(text, "") for text in texts] if style is not None else texts
    tokenizer, prompts = encode_prompts(checkpoint_dir, formatted, max_new_tokens)
    model = load_for_generation(checkpoint_dir, device, dtype, quantize)
    continuation = style is None  # an answer to an instruction starts afresh; a continuation keeps its joining space
    with blame_weights(checkpoint_dir):
        if prompts_file is not None:
            if compile:
                print(NOT_COMPILED_IN_BATCHES, file=sys.stderr)
            answers, stats = generate_batches(model, tokenizer, prompts, max_new_tokens, batch_size=batch_size,
                                              temperature=temperature, top_k=top_k, top_p=top_p, continuation=continuation)
        else:
            answer, stats = generate_streaming(model, tokenizer, prompts[0], max_new_tokens, temperature=temperature,
                                               top_k=top_k, top_p=top_p, continuation=continuation, compile=compile,
                                               echo=prompt if continuation else "")  # the continuation right behind it
            answers = [answer]
    print(stats, file=sys.stderr)
    joined = [text + answer for text, answer in zip(texts, answers)] if continuation else answers
    return joined if prompts_file is not None else joined[0]


if __name__ == "__main__":
    run(main)
