"""Step 2 (GGUF, llama.cpp's format): turn a GGUF model file into a lit-lora checkpoint to finetune.

    python scripts/convert_gguf_checkpoint.py --gguf_path checkpoints/SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf

dequantizes every tensor (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 and the K quants Q2_K ... Q6_K) one at
a time, undoes llama.cpp's q/k row permutation and writes `lit_model.safetensors` and `model_config.json`,
plus the tokenizer rebuilt as `tokenizer.json`, `tokenizer_config.json` (with the chat template) and
`generation_config.json`, beside the GGUF file (or into --output_dir). Needs the gguf package (pip install gguf).
"""

from pathlib import Path
from typing import Optional

from lit_lora.files.gguf import convert_gguf_checkpoint
from lit_lora.files.utils import parse_dtype
from lit_lora.workflows.cli import run


def main(gguf_path: Path, output_dir: Optional[Path] = None, dtype: str = "float32", overwrite: bool = False) -> Path:
    """Convert a llama-architecture GGUF file to lit-lora.

    Args:
        gguf_path: the .gguf file (as llama.cpp, Ollama or LM Studio use it).
        output_dir: where to write the lit-lora checkpoint; defaults to the GGUF file's directory.
        dtype: float32 (default: the dequantized values exactly), bfloat16 or float16 to store the weights in.
        overwrite: replace an earlier result at the output (refused otherwise).
    """
    output = convert_gguf_checkpoint(gguf_path, output_dir, parse_dtype(dtype), overwrite)
    print(f"Wrote the lit-lora checkpoint to {output}")
    return output


if __name__ == "__main__":
    run(main)
