"""Fold a LoRA adapter into its base model: a standalone lit-lora checkpoint with no adapter left.

    python scripts/merge_lora.py --checkpoint_dir checkpoints/Llama-2-7b-hf --lora_path out/lora/lit_lora.safetensors \
        --output_dir checkpoints/Llama-2-7b-merged

Every targeted weight becomes W + (alpha / r) B A (computed in float32, stored in W's dtype), so the
result runs at exactly the base model's speed and loads like any other checkpoint.
"""

from pathlib import Path

from lit_lora.checkpoint import TOKENIZER_NAME, load_checkpoint, save_checkpoint
from lit_lora.cli import run
from lit_lora.lora import apply_lora_checkpoint, merge_lora, remove_lora


def main(checkpoint_dir: Path, lora_path: Path, output_dir: Path) -> Path:
    """Merge a LoRA adapter into its base model and save the result.

    Args:
        checkpoint_dir: the lit-lora base model the adapter was trained on.
        lora_path: the adapter file written by finetune/lora.py (save_lora_checkpoint).
        output_dir: where the merged checkpoint goes (weights, config, and the base's tokenizer);
            must not be checkpoint_dir.
    """
    checkpoint_dir, output_dir = Path(checkpoint_dir), Path(output_dir)
    if output_dir.resolve() == checkpoint_dir.resolve():
        raise ValueError(f"--output_dir {output_dir} is the base checkpoint: choose a new directory")
    model = load_checkpoint(checkpoint_dir)
    lora_config = apply_lora_checkpoint(model, lora_path)
    merged = merge_lora(model)
    remove_lora(model)  # the merged weights stay: a plain Llama with the original parameter names
    tokenizer = checkpoint_dir / TOKENIZER_NAME
    save_checkpoint(output_dir, model.state_dict(), model.config, tokenizer if tokenizer.is_file() else None)
    print(f"merged {lora_config} into {len(merged)} layers; saved {output_dir}"
          + ("" if tokenizer.is_file() else f" (no {TOKENIZER_NAME} in {checkpoint_dir} to copy)"))
    return output_dir


if __name__ == "__main__":
    run(main)
