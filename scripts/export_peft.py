"""Step 6 (optional): export a lit-lora LoRA adapter as a Hugging Face PEFT adapter.

    python scripts/export_peft.py --lora_path out/lora/lit_lora.safetensors --output_dir out/lora/peft \
        --base_model_name_or_path meta-llama/Llama-2-7b-hf

The directory then loads with `PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), dir)`.
Only names change: lit-lora's rotary layout is Hugging Face's, so no tensor is permuted.
"""

from pathlib import Path
from typing import Optional

from lit_lora.files.checkpoint import refuse_to_overwrite
from lit_lora.methods import read_weights
from lit_lora.workflows.cli import run
from lit_lora.workflows.peft import PEFT_WEIGHTS_NAME, save_peft_adapter


def main(lora_path: Path, output_dir: Path, base_model_name_or_path: Optional[str] = None, overwrite: bool = False) -> Path:
    """Write adapter_config.json and adapter_model.safetensors for PEFT.

    Args:
        lora_path: the lit-lora adapter file (finetune/lora.py's lit_lora.safetensors).
        output_dir: the PEFT adapter directory to write.
        base_model_name_or_path: recorded in adapter_config.json so PEFT tools know the base model
            (e.g. meta-llama/Llama-2-7b-hf); optional.
        overwrite: replace an earlier result at the output (refused otherwise).
    """
    weights = read_weights(lora_path, "lora")
    refuse_to_overwrite(Path(output_dir) / PEFT_WEIGHTS_NAME, overwrite)
    save_peft_adapter(output_dir, weights.config, weights.tensors, base_model_name_or_path)
    print(f"exported {weights.config} ({len(weights.tensors)} tensors, base {weights.model_config.name or 'unnamed'}) to {output_dir}")
    return Path(output_dir)


if __name__ == "__main__":
    run(main)
