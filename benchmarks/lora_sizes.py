"""How big LoRA is next to its base model, computed on the meta device (nothing is allocated).

    python benchmarks/lora_sizes.py --model_name 7B --r 8 --targets '[q, v]'
    python benchmarks/lora_sizes.py --model_name 7B --r 8 --targets '[q, v]' --use_dora true
"""

from typing import Dict, Tuple

import torch

from lit_lora.lora import LoRAConfig, add_lora, lora_state_dict, mark_only_lora_as_trainable
from lit_lora.model import Config, Llama
from lit_lora.workflows.cli import run


def main(model_name: str = "7B", r: int = 8, alpha: float = 16.0, targets: Tuple[str, ...] = ("q", "v"),
         use_dora: bool = False) -> Dict[str, int]:
    """Print trainable parameters and checkpoint sizes (tensor bytes; a file adds a small header).

    Args:
        model_name: a Config preset (7B, 13B, 70B, TinyLlama-1.1B, stories15M, ...).
        r: LoRA rank.
        alpha: LoRA alpha (does not change any size; recorded for completeness).
        targets: LoRA targets: q, k, v, o, gate, up, down, head, mlp, all.
        use_dora: DoRA (a magnitude per output feature of every adapted layer besides A and B).
    """
    with torch.device("meta"):
        model = Llama(Config.from_name(model_name))
    base_parameters = sum(p.numel() for p in model.parameters())
    lora_config = LoRAConfig(r=r, alpha=alpha, targets=targets, use_dora=use_dora)
    add_lora(model, lora_config)
    trainable, total = mark_only_lora_as_trainable(model)
    adapter_numel = sum(t.numel() for t in lora_state_dict(model).values())
    sizes = {"trainable": trainable, "total": total, "adapter_fp32_bytes": 4 * adapter_numel,
             "adapter_bf16_bytes": 2 * adapter_numel, "base_bf16_bytes": 2 * base_parameters}
    print(f"{model_name} with {lora_config}:")
    print(f"  trainable parameters  {trainable:,} of {total:,} ({100 * trainable / total:.4f} %)")
    print(f"  adapter checkpoint    {sizes['adapter_fp32_bytes'] / 1e6:.1f} MB fp32, {sizes['adapter_bf16_bytes'] / 1e6:.1f} MB bf16")
    print(f"  base model            {sizes['base_bf16_bytes'] / 1e9:.2f} GB bf16 "
          f"({sizes['base_bf16_bytes'] / sizes['adapter_bf16_bytes']:,.0f}x the bf16 adapter)")
    return sizes


if __name__ == "__main__":
    run(main)
