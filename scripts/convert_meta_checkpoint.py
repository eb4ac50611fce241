"""Step 2 (Meta's original format): turn Meta's Llama 2 download into a lit-lora checkpoint.

    python scripts/convert_meta_checkpoint.py --checkpoint_dir checkpoints/llama-2-13b

reads `params.json` and the tensor-parallel shards `consolidated.00.pth`, `consolidated.01.pth`, ...,
joins them, permutes the q/k rows to the rotate-half rotary layout and writes `lit_model.safetensors`,
`model_config.json` and `tokenizer.model` (found beside the shards or one directory up, where Meta's
download script puts it).
"""

from pathlib import Path
from typing import Optional

from lit_lora.files.convert import convert_meta_checkpoint
from lit_lora.files.utils import parse_dtype
from lit_lora.workflows.cli import run


def main(checkpoint_dir: Path, output_dir: Optional[Path] = None, dtype: Optional[str] = None,
         block_size: int = 4096, overwrite: bool = False) -> Path:
    """Convert Meta's original Llama 2 checkpoint to lit-lora.

    Args:
        checkpoint_dir: directory with params.json and consolidated.NN.pth (e.g. llama-2-7b/).
        output_dir: where to write the lit-lora checkpoint; defaults to checkpoint_dir itself.
        dtype: float32, float16 or bfloat16 to cast the weights; by default they keep the stored dtype.
        block_size: the context length to record (4096 for Llama 2; params.json does not say).
        overwrite: replace an earlier result at the output (refused otherwise).
    """
    output = convert_meta_checkpoint(checkpoint_dir, output_dir, parse_dtype(dtype), block_size, overwrite)
    print(f"Wrote the lit-lora checkpoint to {output}")
    return output


if __name__ == "__main__":
    run(main)
