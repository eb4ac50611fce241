"""Step 4 (for comparison): finetune every weight of the model.

    python finetune/full.py --checkpoint_dir checkpoints/meta-llama/Llama-2-7b-hf --data_dir data/alpaca \
        --devices 4 --strategy fsdp

Full finetuning of 7B needs ~16 bytes per parameter for weights, gradients and AdamW state (~110 GB):
shard it over several GPUs with FSDP. See howto/finetune_full.md.
"""

from pathlib import Path
from typing import Any, Dict, Literal, Optional

from lit_lora.methods import FULL, finetune
from lit_lora.train import TrainArgs
from lit_lora.workflows.cli import run


def main(
    checkpoint_dir: Path = Path("checkpoints/meta-llama/Llama-2-7b-hf"),
    data_dir: Path = Path("data/alpaca"),
    out_dir: Path = Path("out/full/alpaca"),
    train: TrainArgs = TrainArgs(**FULL.recipe),
    precision: Optional[Literal["bf16-true", "bf16-mixed", "16-mixed", "32-true"]] = None,
    devices: int = 1,
    num_nodes: int = 1,
    strategy: Literal["auto", "ddp", "fsdp"] = "auto",
    accelerator: str = "auto",
    resume: Optional[str] = None,
    overwrite: bool = False,
    compile: bool = False,
) -> Dict[str, Any]:
    """Finetune all weights; writes a standalone lit-lora checkpoint to `out_dir/final/`.

    Args:
        checkpoint_dir: the base model (lit_model.safetensors, model_config.json, tokenizer.model or tokenizer.json).
        data_dir: prepared data (scripts/prepare_alpaca.py, prepare_dolly.py or prepare_json.py).
        out_dir: logs, resumable checkpoints, the loss plot and the finetuned checkpoint.
        train: optimisation hyperparameters.
        precision: bf16-true, bf16-mixed, 16-mixed or 32-true; default bf16-true on GPUs that support it, else 32-true.
        devices: devices per node.
        num_nodes: number of nodes.
        strategy: auto, ddp or fsdp (Lightning Fabric strategies; fsdp shards weights, gradients and optimizer state).
        accelerator: auto, cpu or cuda.
        resume: "auto" (the newest readable checkpoint in out_dir) or the path of a resumable checkpoint.
        overwrite: start afresh in an out_dir that holds a finished run or an unfinished run's checkpoints
            (both are deleted); without it such an out_dir is refused.
        compile: torch.compile the forward and backward passes (a C++ compiler on CPU, triton on GPU; the first
            step compiles). Fastest with --train.packing true, whose rows all have one shape.
    """
    return finetune(FULL, dict(locals()))


if __name__ == "__main__":
    run(main)
