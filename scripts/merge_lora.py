"""Step 6 (optional): fold a LoRA adapter into its base model: a standalone lit-lora checkpoint with no adapter left.

    python scripts/merge_lora.py --checkpoint_dir checkpoints/Llama-2-7b-hf --lora_path out/lora/lit_lora.safetensors \
        --output_dir checkpoints/Llama-2-7b-merged

Every targeted weight becomes W + (alpha / r) B A (computed in float32, stored in W's dtype), so the
result runs at exactly the base model's speed and loads like any other checkpoint.
"""

from pathlib import Path

from lit_lora.files.checkpoint import tokenizer_file
from lit_lora.methods import merge_into_checkpoint
from lit_lora.workflows.cli import run


def main(checkpoint_dir: Path, lora_path: Path, output_dir: Path, overwrite: bool = False) -> Path:
    """Merge a LoRA adapter into its base model and save the result.

    Args:
        checkpoint_dir: the lit-lora base model the adapter was trained on.
        lora_path: the adapter file written by finetune/lora.py.
        output_dir: where the merged checkpoint goes (weights, config, and the base's tokenizer);
            must not be checkpoint_dir.
        overwrite: replace an earlier result at the output (refused otherwise).
    """
    output_dir, weights = merge_into_checkpoint(checkpoint_dir, lora_path, output_dir, overwrite)
    copied = tokenizer_file(checkpoint_dir) is not None
    print(f"merged {weights.config} into the base; saved {output_dir}"
          + ("" if copied else f" (no tokenizer.model or tokenizer.json in {checkpoint_dir} to copy)"))
    return output_dir

if __name__ == "__main__":
    run(main)
