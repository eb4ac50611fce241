"""Step 6 (optional): export a lit-lora checkpoint (for example one with LoRA weights merged in) to the Hugging Face format.

    python scripts/convert_lit_checkpoint.py --checkpoint_dir checkpoints/merged --output_dir checkpoints/merged-hf

writes `config.json` (with Llama 3's RoPE scaling when the model has it), `model.safetensors` and the
tokenizer files (`tokenizer.model`, or `tokenizer.json` and its side files); then
`transformers.LlamaForCausalLM.from_pretrained("checkpoints/merged-hf")` loads it. Every tensor is
copied bit for bit, so Hugging Face -> lit-lora -> Hugging Face gives back the original weights.
"""

from pathlib import Path

from lit_lora.files.convert import convert_lit_checkpoint
from lit_lora.workflows.cli import run


def main(checkpoint_dir: Path, output_dir: Path, overwrite: bool = False) -> Path:
    """Convert a lit-lora checkpoint to a Hugging Face one.

    Args:
        checkpoint_dir: lit-lora checkpoint directory (lit_model.safetensors, model_config.json).
        output_dir: directory for the Hugging Face files; must differ from checkpoint_dir.
        overwrite: replace an earlier result at the output (refused otherwise).
    """
    output = convert_lit_checkpoint(checkpoint_dir, output_dir, overwrite)
    print(f"Wrote the Hugging Face checkpoint to {output}")
    return output


if __name__ == "__main__":
    run(main)
