"""Step 4: finetune with LLaMA-Adapter (Zhang et al. 2023): only the gated prompts of the top layers train.

    python finetune/adapter.py --checkpoint_dir checkpoints/meta-llama/Llama-2-7b-hf --data_dir data/alpaca

See howto/finetune_adapter.md for memory needs, multi-GPU runs and hyperparameter advice.
"""

from pathlib import Path
from typing import Any, Dict, Literal, Optional

from lit_lora.adapter import AdapterConfig
from lit_lora.methods import ADAPTER, finetune
from lit_lora.train import TrainArgs
from lit_lora.workflows.cli import run


def main(
    checkpoint_dir: Path = Path("checkpoints/meta-llama/Llama-2-7b-hf"),
    data_dir: Path = Path("data/alpaca"),
    out_dir: Path = Path("out/adapter/alpaca"),
    adapter: AdapterConfig = AdapterConfig(prompt_length=10, start_layer=2),
    train: TrainArgs = TrainArgs(**ADAPTER.recipe),
    precision: Optional[Literal["bf16-true", "bf16-mixed", "16-mixed", "32-true"]] = None,
    devices: int = 1,
    num_nodes: int = 1,
    strategy: Literal["auto", "ddp", "fsdp"] = "auto",
    accelerator: str = "auto",
    resume: Optional[str] = None,
    overwrite: bool = False,
    compile: bool = False,
) -> Dict[str, Any]:
    """Finetune a lit-lora checkpoint with LLaMA-Adapter; writes `out_dir/lit_adapter.safetensors` (adapter only).

    Args:
        checkpoint_dir: the base model (lit_model.safetensors, model_config.json, tokenizer.model or tokenizer.json).
        data_dir: prepared data (scripts/prepare_alpaca.py, prepare_dolly.py or prepare_json.py).
        out_dir: logs, resumable checkpoints, the loss plot and the final adapter.
        adapter: learned prompt length and the first adapted layer.
        train: optimisation hyperparameters.
        precision: bf16-true, bf16-mixed, 16-mixed or 32-true; default bf16-true on GPUs that support it, else 32-true.
        devices: devices per node.
        num_nodes: number of nodes.
        strategy: auto, ddp or fsdp (Lightning Fabric strategies).
        accelerator: auto, cpu or cuda.
        resume: "auto" (the newest readable checkpoint in out_dir) or the path of a resumable checkpoint.
        overwrite: start afresh in an out_dir that holds a finished run or an unfinished run's checkpoints
            (both are deleted); without it such an out_dir is refused.
        compile: torch.compile the forward and backward passes (a C++ compiler on CPU, triton on GPU; the first
            step compiles). Fastest with --train.packing true, whose rows all have one shape.
    """
    return finetune(ADAPTER, dict(locals()))


if __name__ == "__main__":
    run(main)
