"""Step 4: finetune with LLaMA-Adapter (Zhang et al. 2023): only the gated prompts of the top layers train.

    python finetune/adapter.py --checkpoint_dir checkpoints/meta-llama/Llama-2-7b-hf --data_dir data/alpaca

See howto/finetune_adapter.md for memory needs, multi-GPU runs and hyperparameter advice.
"""

from pathlib import Path
from typing import Any, Dict, Literal, Optional

from lit_lora.adapter import AdapterConfig, add_adapter, mark_only_adapter_as_trainable, save_adapter_checkpoint
from lit_lora.cli import run
from lit_lora.train import TrainArgs, fit, make_sampler, start_run


def main(
    checkpoint_dir: Path = Path("checkpoints/meta-llama/Llama-2-7b-hf"),
    data_dir: Path = Path("data/alpaca"),
    out_dir: Path = Path("out/adapter/alpaca"),
    adapter: AdapterConfig = AdapterConfig(prompt_length=10, start_layer=2),
    train: TrainArgs = TrainArgs(learning_rate=9e-3, weight_decay=0.02, global_batch_size=64, micro_batch_size=4, warmup_steps=100),
    precision: Optional[Literal["bf16-true", "bf16-mixed", "16-mixed", "32-true"]] = None,
    devices: int = 1,
    num_nodes: int = 1,
    strategy: Literal["auto", "ddp", "fsdp"] = "auto",
    accelerator: str = "auto",
    resume: Optional[str] = None,
    overwrite: bool = False,
) -> Dict[str, Any]:
    """Finetune a lit-lora checkpoint with LLaMA-Adapter; writes `out_dir/lit_adapter.safetensors` (adapter only).

    Args:
        checkpoint_dir: the base model (lit_model.safetensors, model_config.json, tokenizer.model).
        data_dir: prepared data (scripts/prepare_alpaca.py, prepare_dolly.py or prepare_json.py).
        out_dir: logs, resumable checkpoints, the loss plot and the final adapter.
        adapter: learned prompt length and the first adapted layer.
        train: optimisation hyperparameters.
        precision: bf16-true, bf16-mixed, 16-mixed or 32-true; default bf16-true on GPUs that support it, else 32-true.
        devices: devices per node.
        num_nodes: number of nodes.
        strategy: auto, ddp or fsdp (Lightning Fabric strategies).
        accelerator: auto, cpu or cuda.
        resume: "auto" (the newest checkpoint in out_dir) or the path of a resumable checkpoint.
        overwrite: replace a finished run in out_dir.
    """
    hyperparameters = dict(locals())
    session = start_run(checkpoint_dir, data_dir, out_dir, train, precision, devices, num_nodes, strategy, accelerator)
    add_adapter(session.model, adapter)
    mark_only_adapter_as_trainable(session.model)
    return fit(session.fabric, session.model, session.train_data, session.val_data, train, out_dir,
               save_weights=lambda path, model: save_adapter_checkpoint(path, model, adapter),
               weights_name="lit_adapter.safetensors",
               sample=make_sampler(session.tokenizer, session.prompt_style, train.sample_instruction),
               resume=resume, overwrite=overwrite, hyperparameters=hyperparameters)


if __name__ == "__main__":
    run(main)
