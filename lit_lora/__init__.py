"""lit-lora: Llama 2 with LoRA and LLaMA-Adapter, written to be read."""

from lit_lora.checkpoint import load_checkpoint
from lit_lora.model import Config, Llama

__all__ = ["Config", "Llama", "load_checkpoint"]
