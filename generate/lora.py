"""Step 5: answer an instruction with a LoRA-finetuned model: the base checkpoint plus one or more adapters.

    python generate/lora.py --checkpoint_dir checkpoints/meta-llama/Llama-2-7b-hf \
        --lora_path out/lora/alpaca/lit_lora.safetensors --prompt "Recommend a movie for the weekend."

The adapter file describes itself (rank, alpha, targets, base model, the prompt style it was trained
with), so nothing is retyped. By default
its update is merged into the weights, W <- W + (alpha / r) B A, and the model runs at exactly the base
model's speed; `--merge false` keeps the low-rank branch separate instead.

One base, many adapters: `--lora_path '[a.safetensors, b.safetensors]'` (or `--lora_path a.safetensors
--lora_path+ b.safetensors`) loads the base weights once and answers with each adapter in turn, taking
the previous one out (unmerge, then remove) before adding the next. Only the response goes to stdout
(under a `### <adapter>` line each when there are several); timing and memory go to stderr.
"""

from pathlib import Path
from typing import List, Literal, Optional, Union

from lit_lora.generate import check_generation_settings
from lit_lora.speed.quantize import QuantizeMode
from lit_lora.workflows.cli import run
from lit_lora.workflows.inference import answer_with_each, read_prompts_file


def main(
    checkpoint_dir: Path = Path("checkpoints/meta-llama/Llama-2-7b-hf"),
    lora_path: Union[Path, List[Path]] = Path("out/lora/alpaca/lit_lora.safetensors"),
    prompt: str = "What food do llamas eat?",
    input: str = "",
    merge: bool = True,
    prompt_style: Optional[str] = None,
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
) -> List[str]:
    """Answer `prompt` (an instruction, with an optional `input`) with each LoRA adapter.

    Args:
        checkpoint_dir: the base model the adapters were trained on.
        lora_path: an adapter file written by finetune/lora.py, or a list of them ('[a, b]').
        prompt: the instruction.
        input: optional context for the instruction (the "### Input:" part of the Alpaca template).
        merge: fold the update into the weights (no inference overhead); false keeps it as a separate branch.
        prompt_style: the instruction template (lit_lora/prompts.py); default: the one each adapter file
            records that it was trained with.
        max_new_tokens: the most tokens to generate (fewer if the model emits EOS or the context ends).
        temperature: 0 is greedy decoding; below 1 sharper, above 1 more random.
        top_k: sample only among the k most likely tokens (null: all).
        top_p: sample only among the most likely tokens whose probability reaches p (nucleus sampling).
        seed: random seed, for reproducible sampling (each adapter starts from it).
        device: "auto" (a CUDA GPU if there is one), "cpu", "cuda" or "cuda:N".
        dtype: "auto" is bf16 on GPUs that support it and on CPUs with native bf16 (AVX512-BF16/AMX), else float32.
        quantize: keep the linear layers in 4 bits, "nf4" or "nf4-dq" (QLoRA; see howto/finetune_qlora.md), or
            in 8 bits, "int8": the fastest decoding on a CPU with native bf16 (see howto/inference.md).
        compile: torch.compile the model before generating: faster decoding after 10-60 s of compiling (one prompt).
        prompts_file: answer every instruction of this file instead of `prompt` (one per line, or a JSON list
            of strings), `batch_size` at a time in one batch each, under `### prompt N` lines.
        batch_size: instructions answered together with --prompts_file.
    """
    check_generation_settings(max_new_tokens, temperature, top_k, top_p)
    return answer_with_each(checkpoint_dir, lora_path if isinstance(lora_path, list) else [lora_path], "lora",
                            read_prompts_file(prompts_file) if prompts_file is not None else prompt, input,
                            prompt_style, merge, max_new_tokens, temperature, top_k, top_p, seed, device, dtype,
                            quantize, compile, batch_size)

if __name__ == "__main__":
    run(main)
