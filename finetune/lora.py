"""Step 4: finetune with LoRA (Hu et al. 2021): only the low-rank A and B matrices train.

    python finetune/lora.py --checkpoint_dir checkpoints/meta-llama/Llama-2-7b-hf --data_dir data/alpaca

See howto/finetune_lora.md for memory needs, multi-GPU runs and hyperparameter advice.
"""

from pathlib import Path
from typing import Any, Dict, Literal, Optional

from lit_lora.lora import LoRAConfig
from lit_lora.methods import LORA, finetune
from lit_lora.speed.quantize import QLoRAMode
from lit_lora.train import TrainArgs
from lit_lora.workflows.cli import run


def main(
    checkpoint_dir: Path = Path("checkpoints/meta-llama/Llama-2-7b-hf"),
    data_dir: Path = Path("data/alpaca"),
    out_dir: Path = Path("out/lora/alpaca"),
    lora: LoRAConfig = LoRAConfig(r=8, alpha=16, dropout=0.05, targets=("q", "v")),
    train: TrainArgs = TrainArgs(**LORA.recipe),
    precision: Optional[Literal["bf16-true", "bf16-mixed", "16-mixed", "32-true"]] = None,
    devices: int = 1,
    num_nodes: int = 1,
    strategy: Literal["auto", "ddp", "fsdp"] = "auto",
    accelerator: str = "auto",
    quantize: Optional[QLoRAMode] = None,
    resume: Optional[str] = None,
    overwrite: bool = False,
    compile: bool = False,
) -> Dict[str, Any]:
    """Finetune a lit-lora checkpoint with LoRA; writes `out_dir/lit_lora.safetensors` (adapter only).

    Args:
        checkpoint_dir: the base model (lit_model.safetensors, model_config.json, tokenizer.model or tokenizer.json).
        data_dir: prepared data (scripts/prepare_alpaca.py, prepare_dolly.py or prepare_json.py).
        out_dir: logs, resumable checkpoints, the loss plot and the final adapter.
        lora: rank r, alpha (the update is scaled by alpha / r, or alpha / sqrt(r) with use_rslora), dropout,
            the targeted projections, DoRA (use_dora), per-layer rank_pattern / alpha_pattern, LoRA+ (lr_ratio).
        train: optimisation hyperparameters.
        precision: bf16-true, bf16-mixed, 16-mixed or 32-true; default bf16-true on GPUs that support it, else 32-true.
        devices: devices per node.
        num_nodes: number of nodes.
        strategy: auto, ddp or fsdp (Lightning Fabric strategies).
        accelerator: auto, cpu or cuda.
        quantize: QLoRA: keep the frozen base in 4 bits, nf4 or nf4-dq (double-quantized scales); see howto/finetune_qlora.md.
        resume: "auto" (the newest readable checkpoint in out_dir) or the path of a resumable checkpoint.
        overwrite: start afresh in an out_dir that holds a finished run or an unfinished run's checkpoints
            (both are deleted); without it such an out_dir is refused.
        compile: torch.compile the forward and backward passes (a C++ compiler on CPU, triton on GPU; the first
            step compiles). Fastest with --train.packing true, whose rows all have one shape.
    """
    return finetune(LORA, dict(locals()))


if __name__ == "__main__":
    run(main)
