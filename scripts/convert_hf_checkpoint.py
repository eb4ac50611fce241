"""Step 2 (Hugging Face format): turn a downloaded Hugging Face Llama checkpoint into a lit-lora one.

    python scripts/convert_hf_checkpoint.py --checkpoint_dir checkpoints/meta-llama/Llama-2-7b-hf
    python scripts/convert_hf_checkpoint.py --checkpoint_dir checkpoints/meta-llama/Llama-3.2-1B
    python scripts/convert_hf_checkpoint.py --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M

writes `lit_model.safetensors` and `model_config.json` beside the Hugging Face files (or into
--output_dir) with copies of the tokenizer files, one tensor at a time: converting 7B needs about one model's worth of RAM, or less.
"""

from pathlib import Path
from typing import Optional

from lit_lora.files.convert import convert_hf_checkpoint
from lit_lora.files.utils import parse_dtype
from lit_lora.workflows.cli import run


def main(checkpoint_dir: Path, output_dir: Optional[Path] = None, dtype: Optional[str] = None,
         overwrite: bool = False) -> Path:
    """Convert a Hugging Face Llama checkpoint to lit-lora.

    Args:
        checkpoint_dir: directory with config.json and model*.safetensors or pytorch_model*.bin
            (sharded checkpoints with their *.index.json), as scripts/download.py leaves it.
        output_dir: where to write the lit-lora checkpoint; defaults to checkpoint_dir itself.
        dtype: float32, float16 or bfloat16 to cast the weights; by default they keep the stored dtype.
        overwrite: replace an earlier result at the output (refused otherwise).
    """
    output = convert_hf_checkpoint(checkpoint_dir, output_dir, parse_dtype(dtype), overwrite)
    print(f"Wrote the lit-lora checkpoint to {output}")
    return output


if __name__ == "__main__":
    run(main)
