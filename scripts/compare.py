"""Step 4 (to compare methods): LoRA, LLaMA-Adapter and (optionally) full finetuning on any checkpoint and prepared dataset,
each run exactly as its finetune script runs it, with the same data order and the same budget.

    python scripts/compare.py --checkpoint_dir checkpoints/meta-llama/Llama-2-7b-hf --data_dir data/alpaca \
        --max_steps 1000 --eval_file data/my_eval.json

    python scripts/compare.py ... --methods '[lora-r8-qv, lora-r8-all, lora-r64-qv, lora-r64-all]'   # LoRA sweep

Writes out_dir/comparison.md (trainable parameters, adapter size, peak memory, seconds per step, final
validation loss, and exact-match accuracy when --eval_file is given), comparison.json, loss_curves.png
and one update heatmap per LoRA run. Runs happen one after another in this process; for a run
that needs several GPUs (full finetuning of 7B with FSDP), run finetune/full.py yourself and add its
out_dir with --include. See howto/compare_lora_adapter.md.
"""

from pathlib import Path
from typing import Dict, List, Optional

from lit_lora.evaluation.compare import LORA_SWEEP, compare_methods, parse_variant
from lit_lora.workflows.cli import run


def main(
    checkpoint_dir: Path = Path("checkpoints/meta-llama/Llama-2-7b-hf"),
    data_dir: Path = Path("data/alpaca"),
    out_dir: Path = Path("out/compare"),
    methods: List[str] = ["lora", "adapter"],
    lora_sweep: bool = False,
    include: List[Path] = [],
    learning_rates: Dict[str, float] = {},
    max_steps: int = 500,
    global_batch_size: int = 64,
    micro_batch_size: int = 4,
    warmup_steps: int = 100,
    eval_interval: int = 100,
    eval_iters: int = 50,
    seed: int = 1337,
    eval_file: Optional[Path] = None,
    max_new_tokens: int = 64,
    precision: Optional[str] = None,
    accelerator: str = "auto",
    overwrite: bool = False,
    tasks: List[str] = [],
    task_limit: Optional[int] = None,
    include_path: Optional[Path] = None,
    packing: bool = False,
    compile: bool = False,
) -> str:
    """Finetune every method on the same budget and write the comparison table and plots.

    Args:
        checkpoint_dir: the base model (a lit-lora checkpoint directory).
        data_dir: prepared data (scripts/prepare_alpaca.py, prepare_dolly.py or prepare_json.py).
        out_dir: one sub-directory per method, plus comparison.md, comparison.json and the PNGs.
        methods: any method of lit_lora/methods.py (lora, adapter, full, each with its defaults: LoRA r=8 on
            q and v, the Adapter's 10 prompt tokens from layer 2), and lora-r<rank>-<qv|all> (e.g. lora-r64-all:
            rank 64, alpha 128, on every linear layer of the blocks).
        lora_sweep: add lora-r8-qv, lora-r8-all, lora-r64-qv and lora-r64-all to the methods.
        include: out_dirs of runs finished before (finetune/<method>.py), shown beside the new ones,
            e.g. full finetuning run on several GPUs.
        learning_rates: per method ("lora", "adapter", "full"), instead of the method's recipe
            (3e-4, 9e-3, 3e-5), e.g. --learning_rates '{lora: 1e-3}'.
        max_steps: optimizer steps, the same for every method.
        global_batch_size: samples per optimizer step, the same for every method.
        micro_batch_size: samples per forward/backward pass (lower it if a method runs out of memory;
            the global batch, and so the result, stays the same).
        warmup_steps: linear learning-rate warmup steps.
        eval_interval: validate every N steps (the points of the validation curves).
        eval_iters: validation micro-batches per evaluation.
        seed: seeds the data order (the same for every method) and the adapters' initialisation.
        eval_file: a JSON list of {"instruction", "input" (optional), "output" or "answer"} held out from
            training; each model answers greedily and is scored by exact match. Without it the table
            compares the final validation loss only.
        max_new_tokens: the longest answer generated for the eval file.
        precision: bf16-true, bf16-mixed, 16-mixed or 32-true; default bf16-true on GPUs that support it, else 32-true.
        accelerator: auto, cpu or cuda.
        overwrite: replace the runs of an earlier comparison in out_dir (refused otherwise).
        tasks: lm-eval tasks to score every model on, one column each (needs pip install -e ".[eval]").
        task_limit: at most this many examples per task.
        include_path: a folder of your own lm-eval task YAMLs.
        packing: pack several samples into each row (see finetune --train.packing); batch sizes then count rows.
        compile: torch.compile every method's training step (see finetune --compile).
    """
    variants = [parse_variant(spec) for spec in list(methods) + (list(LORA_SWEEP) if lora_sweep else [])]
    budget = dict(max_steps=max_steps, global_batch_size=global_batch_size, micro_batch_size=micro_batch_size,
                  warmup_steps=warmup_steps, eval_interval=eval_interval, eval_iters=eval_iters, seed=seed,
                  save_interval=max_steps + 1, packing=packing)
    report = compare_methods(checkpoint_dir, data_dir, out_dir, variants, budget, include, learning_rates, eval_file,
                             max_new_tokens, precision, accelerator, overwrite, tasks, task_limit, include_path,
                             compile_model=compile)
    print(report)
    print(f"wrote {Path(out_dir) / 'comparison.md'} and the plots in {out_dir}")
    return report

if __name__ == "__main__":
    run(main)
