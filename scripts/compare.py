"""Compare LoRA, LLaMA-Adapter and (optionally) full finetuning on any checkpoint and prepared dataset,
each through its own finetune script, with the same data order and the same budget.

    python scripts/compare.py --checkpoint_dir checkpoints/meta-llama/Llama-2-7b-hf --data_dir data/alpaca \
        --max_steps 1000 --eval_file data/my_eval.json

    python scripts/compare.py ... --methods '[lora-r8-qv, lora-r8-all, lora-r64-qv, lora-r64-all]'   # LoRA sweep

Writes out_dir/comparison.md (trainable parameters, adapter size, peak memory, seconds per step, final
validation loss, and exact-match accuracy when --eval_file is given), comparison.json, loss_curves.png
and one LoRA update heatmap per LoRA run. Runs happen one after another in this process; for a run
that needs several GPUs (full finetuning of 7B with FSDP), run finetune/full.py yourself and add its
out_dir with --include. See howto/compare_lora_adapter.md.
"""

from dataclasses import replace
from pathlib import Path
from typing import Dict, List, Optional

import torch

from lit_lora.checkpoint import TOKENIZER_NAME
from lit_lora.cli import run
from lit_lora.compare import (LORA_SWEEP, RunResult, exact_match, finetune, load_eval_records, load_finetuned,
                              load_finished_run, parse_variant, plot_lora_heatmap, plot_loss_curves, release_memory,
                              script_recipe, write_report)
from lit_lora.data import load_prepare_config
from lit_lora.prompts import get_prompt_style
from lit_lora.tokenizer import Tokenizer


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
) -> str:
    """Finetune every method on the same budget and write the comparison table and plots.

    Args:
        checkpoint_dir: the base model (a lit-lora checkpoint directory).
        data_dir: prepared data (scripts/prepare_alpaca.py, prepare_dolly.py or prepare_json.py).
        out_dir: one sub-directory per method, plus comparison.md, comparison.json and the PNGs.
        methods: any of lora, adapter, full (each with its script's defaults: LoRA r=8 on q and v, the
            Adapter's 10 prompt tokens from layer 2), and lora-r<rank>-<qv|all> (e.g. lora-r64-all: rank 64,
            alpha 128, on every linear layer of the blocks).
        lora_sweep: add lora-r8-qv, lora-r8-all, lora-r64-qv and lora-r64-all to the methods.
        include: out_dirs of runs finished before (finetune/<method>.py), shown beside the new ones,
            e.g. full finetuning run on several GPUs.
        learning_rates: per method ("lora", "adapter", "full"), instead of the script's default
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
    """
    variants = [parse_variant(spec) for spec in list(methods) + (list(LORA_SWEEP) if lora_sweep else [])]
    names = [variant.name for variant in variants] + [str(path) for path in include]
    if len(set(names)) != len(names):
        raise ValueError(f"a method is listed twice: {names}")
    unknown = sorted(set(learning_rates) - {"lora", "adapter", "full"})
    if unknown:
        raise ValueError(f"--learning_rates: unknown methods {unknown}; use lora, adapter or full")
    records = load_eval_records(eval_file) if eval_file is not None else None  # fail early on a bad file
    finished = [load_finished_run(path, name=str(path)) for path in include]
    if not variants and not finished:
        raise ValueError("nothing to compare: give --methods, --lora_sweep or --include")
    device = torch.device("cuda" if accelerator != "cpu" and torch.cuda.is_available() else "cpu")
    out_dir = Path(out_dir)

    budget = dict(max_steps=max_steps, global_batch_size=global_batch_size, micro_batch_size=micro_batch_size,
                  warmup_steps=warmup_steps, eval_interval=eval_interval, eval_iters=eval_iters, seed=seed,
                  save_interval=max_steps + 1)
    results: List[RunResult] = []
    for variant in variants:
        recipe = script_recipe(variant.method)  # the method's own learning rate and weight decay
        train = replace(recipe, **budget, learning_rate=learning_rates.get(variant.method, recipe.learning_rate))
        print(f"\n=== {variant.name}: {max_steps} steps of {global_batch_size}, learning rate {train.learning_rate:g} ===",
              flush=True)
        results.append(finetune(variant, out_dir / variant.name, device, checkpoint_dir=checkpoint_dir,
                                data_dir=data_dir, train=train, precision=precision, accelerator=accelerator))
        release_memory()
    results += finished

    if records is not None:
        tokenizer = Tokenizer(Path(checkpoint_dir) / TOKENIZER_NAME)
        style = get_prompt_style(load_prepare_config(data_dir)["prompt_style"])
        results.insert(0, RunResult("base model (no finetuning)", "base"))
        for result in results:
            dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
            model = load_finetuned(result, checkpoint_dir, device, dtype=dtype)
            result.accuracy = exact_match(model, tokenizer, style, records, max_new_tokens=max_new_tokens)
            print(f"{result.name}: {100 * result.accuracy.accuracy:.1f} % exact match "
                  f"({result.accuracy.correct}/{result.accuracy.total})", flush=True)
            del model
            release_memory()

    notes = [f"checkpoint {checkpoint_dir}, data {data_dir}; {max_steps} steps of {global_batch_size} samples in the "
             f"same order (seed {seed}) for every method trained here"]
    notes.append(f"accuracy: exact match on {len(records)} instructions of {eval_file}, greedy decoding"
                 if records is not None else "no --eval_file: compare the final validation loss")
    report = write_report(results, out_dir, f"Finetuning methods compared on {Path(checkpoint_dir).name}", notes)
    plot_loss_curves(results, out_dir / "loss_curves.png")
    for result in results:
        if result.method == "lora":
            file_name = "".join(c if c.isalnum() or c in "-." else "_" for c in result.name)
            plot_lora_heatmap(result.weights_path, out_dir / f"lora_update_heatmap_{file_name}.png",
                              title=f"{result.name}: (alpha / r) ||B A||_F per layer and projection")
    print(report)
    print(f"wrote {out_dir / 'comparison.md'} and the plots in {out_dir}")
    return report


if __name__ == "__main__":
    run(main)
