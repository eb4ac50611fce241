"""Step 6 (optional): import a Hugging Face PEFT LoRA adapter as a lit-lora adapter file.

    python scripts/import_peft.py --peft_dir some-peft-adapter --checkpoint_dir checkpoints/Llama-2-7b-hf \
        --output_path out/lora/imported.safetensors

The adapter must be plain LoRA (no DoRA, rsLoRA, per-layer ranks, biases or modules_to_save) on the
Llama layers q/k/v/o_proj, gate/up/down_proj or lm_head, in every layer, saved as safetensors.
"""

from pathlib import Path

from lit_lora.files.checkpoint import MethodFile, load_config, refuse_to_overwrite, save_method_file
from lit_lora.workflows.cli import run
from lit_lora.workflows.peft import load_peft_adapter


def main(peft_dir: Path, checkpoint_dir: Path, output_path: Path, overwrite: bool = False) -> Path:
    """Convert a PEFT adapter directory into one lit-lora adapter file.

    Args:
        peft_dir: directory with adapter_config.json and adapter_model.safetensors.
        checkpoint_dir: the lit-lora conversion of the adapter's base model; its config is recorded in
            the adapter file and every tensor's shape is checked against it.
        output_path: the lit-lora adapter file to write (use it with generate/lora.py or lit_lora.methods.apply_weights).
        overwrite: replace an earlier result at the output (refused otherwise).
    """
    refuse_to_overwrite(output_path, overwrite)
    model_config = load_config(checkpoint_dir)
    lora_config, state, ignored = load_peft_adapter(peft_dir, model_config)
    save_method_file(output_path, MethodFile("lora", lora_config.to_dict(), model_config, state))
    note = f"; ignored PEFT's copies of the base weights {ignored}" if ignored else ""
    print(f"imported {lora_config} ({len(state)} tensors) to {output_path}{note}")
    return Path(output_path)


if __name__ == "__main__":
    run(main)
