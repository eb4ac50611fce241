"""Export a lit-lora LoRA adapter as a Hugging Face PEFT adapter.

    python scripts/export_peft.py --lora_path out/lora/lit_lora.safetensors --output_dir out/lora/peft \
        --base_model_name_or_path meta-llama/Llama-2-7b-hf

The directory then loads with `PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), dir)`.
Only names change: lit-lora's rotary layout is Hugging Face's, so no tensor is permuted.
"""

from pathlib import Path
from typing import Optional

from lit_lora.cli import run
from lit_lora.lora import load_lora_checkpoint
from lit_lora.peft_interop import save_peft_adapter


def main(lora_path: Path, output_dir: Path, base_model_name_or_path: Optional[str] = None) -> Path:
    """Write adapter_config.json and adapter_model.safetensors for PEFT.

    Args:
        lora_path: the lit-lora adapter file (save_lora_checkpoint).
        output_dir: the PEFT adapter directory to write.
        base_model_name_or_path: recorded in adapter_config.json so PEFT tools know the base model
            (e.g. meta-llama/Llama-2-7b-hf); optional.
    """
    lora_config, model_config, state = load_lora_checkpoint(lora_path)
    save_peft_adapter(output_dir, lora_config, state, base_model_name_or_path)
    print(f"exported {lora_config} ({len(state)} tensors, base {model_config.name or 'unnamed'}) to {output_dir}")
    return Path(output_dir)


if __name__ == "__main__":
    run(main)
