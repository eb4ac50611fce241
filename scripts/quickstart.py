"""Step 0, the main job: the whole journey offline, on a CPU, in minutes: a tiny Llama pretrained on a synthetic world, then
finetuned with LoRA, DoRA and LLaMA-Adapter on the same budget, and scored on held-out instructions.

    python scripts/quickstart.py                      # everything lands in out/quickstart (a rerun replaces it)

    1. a synthetic world: a corpus and Alpaca-format instructions (train, and held-out test)
    2. a SentencePiece tokenizer and a ~1M-parameter Llama pretrained on the corpus (reused by reruns)
    3. the instructions prepared exactly like Alpaca (lit_lora.workflows.prepare)
    4. LoRA, DoRA and LLaMA-Adapter finetuned exactly as finetune/lora.py and finetune/adapter.py do
    5. held-out exact-match accuracy of the base model and of each finetuned one
    6. the side-by-side table (comparison.md) and plots (loss_curves.png, lora_ and dora_update_heatmap.png)
    7. LoRA merged into the base (as scripts/merge_lora.py does), and an instruction answered (as generate/lora.py does)

howto/compare_lora_adapter.md explains the numbers; lit_lora/evaluation/synthetic.py how the world is made.
"""

import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict

import torch

from lit_lora.adapter import AdapterConfig
from lit_lora.evaluation.compare import (PEAK_MEMORY_NOTE, STEP_SECONDS_NOTE, RunResult, Variant, exact_match, finetune,
                                         load_eval_records, load_finetuned, plot_update, release_memory, write_report)
from lit_lora.evaluation.synthetic import (PRETRAIN_ARGS, TINY_BASE, WEIGHTS_DIR_NAME, WorldConfig, build_world, fingerprint,
                                           pretrain, tokenizer_texts, train_tokenizer, write_world)
from lit_lora.files.checkpoint import WEIGHTS_NAME, load_checkpoint, load_json, save_json
from lit_lora.files.plots import plot_loss_curves
from lit_lora.generate import generate
from lit_lora.lora import LoRAConfig
from lit_lora.methods import merge_into_checkpoint
from lit_lora.prompts import get_prompt_style
from lit_lora.tokenizer import Tokenizer
from lit_lora.train import TrainArgs, default_precision
from lit_lora.workflows.cli import run
from lit_lora.workflows.inference import answer_with_each
from lit_lora.workflows.prepare import format_summary, prepare_instruction_data


STEPS = 7
# Step 4's contestants, each with its own directory and learning rate. LoRA and DoRA on every linear layer
# of the blocks; the Adapter in every layer (the paper adapts the top 30 of 32 layers of 7B; with 4 layers,
# all of them). Learning rates: the best of {1e-2, 2e-2, 5e-2} for the Adapter and {2e-3, 5e-3} for LoRA on
# this world; DoRA takes LoRA's.
LORA = Variant("LoRA (r=8, all linear layers)", "lora",
               {"lora": LoRAConfig(r=8, alpha=16, dropout=0.0, targets=("q", "k", "v", "o", "mlp"))})
DORA = Variant("DoRA (r=8, all linear layers)", "lora",
               {"lora": LoRAConfig(r=8, alpha=16, dropout=0.0, targets=("q", "k", "v", "o", "mlp"), use_dora=True)})
ADAPTER = Variant("LLaMA-Adapter (10 prompt tokens, all layers)", "adapter",
                  {"adapter": AdapterConfig(prompt_length=10, start_layer=0)})
CONTESTANTS = (("lora", LORA, 2e-3), ("dora", DORA, 2e-3), ("adapter", ADAPTER, 5e-2))


def banner(step: int, title: str) -> None:
    print(f"\n{'=' * 78}\nStep {step}/{STEPS}: {title}\n{'=' * 78}", flush=True)


def main(
    out_dir: Path = Path("out/quickstart"),
    seed: int = 1337,
    fast: bool = False,
    accelerator: str = "auto",
) -> Dict[str, Any]:
    """Build the synthetic world, pretrain a tiny base, finetune LoRA and LLaMA-Adapter, compare them.

    Args:
        out_dir: where everything is written; a base pretrained there before with the same settings is reused.
        seed: seeds the world, the base model's pretraining and both finetuning runs.
        fast: a reduced run (1/8 of the corpus and of every step count) that checks the whole pipeline
            in well under a minute; its accuracies mean nothing.
        accelerator: "auto" (a GPU if there is one), "cpu" or "cuda".
    """
    start = time.perf_counter()
    out_dir = Path(out_dir)
    style = get_prompt_style("alpaca")
    scale = 8 if fast else 1
    precision = default_precision(accelerator)
    device = torch.device("cuda" if accelerator != "cpu" and torch.cuda.is_available() else "cpu")

    banner(1, "a synthetic world: corpus, train instructions, held-out test instructions")
    world = build_world(WorldConfig(seed=seed, corpus_rounds=WorldConfig.corpus_rounds // scale))
    paths = write_world(world, out_dir / "world")
    print(f"{len(world.corpus):,} corpus documents, {len(world.train)} train and {len(world.test)} held-out test "
          f"instructions over {len(world.config.tasks)} tasks, in {paths['corpus'].parent}")
    for fact in {fact.task: fact for fact in reversed(world.test)}.values():  # one example per task
        print(f"  the corpus says {fact.statement!r:38} a test asks {fact.instruction!r} -> {fact.answer!r}")

    banner(2, "a SentencePiece tokenizer and a tiny Llama pretrained on the corpus")
    base_dir = out_dir / "base"
    checkpoint_dir = base_dir / WEIGHTS_DIR_NAME
    pretrain_args = replace(PRETRAIN_ARGS, seed=seed, max_steps=PRETRAIN_ARGS.max_steps // scale,
                            warmup_steps=PRETRAIN_ARGS.warmup_steps // scale,
                            eval_interval=PRETRAIN_ARGS.eval_interval // scale)
    settings = fingerprint(world.corpus, [f.instruction for f in world.train], TINY_BASE.to_dict(),
                           vars(pretrain_args), str(device))
    stamp = base_dir / "fingerprint.json"
    if stamp.is_file() and load_json(stamp).get("settings") == settings and (checkpoint_dir / WEIGHTS_NAME).is_file():
        print(f"reusing the base pretrained in {checkpoint_dir} (same world and settings; delete it to pretrain again)")
    else:
        tokenizer_path = train_tokenizer(tokenizer_texts(world, style), base_dir / "tokenizer.model",
                                         TINY_BASE.vocab_size)
        print(f"trained a {TINY_BASE.vocab_size}-piece BPE tokenizer: {tokenizer_path}")
        pretrained = pretrain(base_dir, world.corpus, tokenizer_path, TINY_BASE, pretrain_args, accelerator=accelerator)
        save_json({"settings": settings, "val_loss": pretrained["val_loss"]}, stamp)
    tokenizer = Tokenizer(checkpoint_dir)

    banner(3, "the instructions prepared like Alpaca (lit_lora.workflows.prepare.prepare_instruction_data)")
    data_dir = out_dir / "data"
    prepared = prepare_instruction_data(paths["train"], data_dir, tokenizer.model_path,
                                        max_seq_length=TINY_BASE.block_size, val_size=len(world.train) // 10, seed=seed)
    print(format_summary(prepared, data_dir))

    banner(4, "LoRA, DoRA and LLaMA-Adapter finetuned on the same data order and budget")
    budget = dict(global_batch_size=16, micro_batch_size=16, warmup_steps=20 // scale, max_steps=400 // scale,
                  eval_interval=50 // scale, eval_iters=4, save_interval=100_000, log_interval=10, seed=seed,
                  sample_instruction=world.test[0].instruction)
    results = [RunResult("base model (no finetuning)", "base")]
    for directory, variant, learning_rate in CONTESTANTS:
        print(f"\n--- {variant.name}, learning rate {learning_rate:g} ---")
        results.append(finetune(variant, out_dir / directory, device, checkpoint_dir=checkpoint_dir,
                                data_dir=data_dir, train=TrainArgs(learning_rate=learning_rate, **budget),
                                precision=precision, accelerator=accelerator, overwrite=True))

    banner(5, "held-out exact-match accuracy (greedy answers to test instructions never trained on)")
    records = load_eval_records(paths["test"])
    for result in results:
        release_memory()
        result.accuracy = exact_match(load_finetuned(result, checkpoint_dir, device), tokenizer, style, records)
        score, example = result.accuracy, result.accuracy.predictions[0]
        print(f"{result.name:46} {100 * score.accuracy:5.1f} % ({score.correct}/{score.total})"
              f"   e.g. {example['instruction']!r} -> {example['prediction']!r}")

    banner(6, "the side-by-side table and the plots")
    misformatted = ", ".join(f"{r.name} {r.accuracy.right_but_misformatted()}/{r.accuracy.total}" for r in results)
    notes = [f"{len(records)} held-out test instructions ({', '.join(world.config.tasks)}), keys never seen in "
             "finetuning; greedy decoding; exact match after stripping whitespace",
             f"same budget: {budget['max_steps']} steps of {budget['global_batch_size']} samples in the same order "
             f"(seed {seed}); learning rate " + ", ".join(f"{rate:g} ({variant.name.split(' ')[0]})"
                                                           for _, variant, rate in CONTESTANTS),
             f"the right answer in the wrong format (e.g. \"15.\" for \"15\"; counted as wrong): {misformatted}",
             PEAK_MEMORY_NOTE[device.type == "cuda"], STEP_SECONDS_NOTE,
             f"base model: a {TINY_BASE.n_layer}-layer Llama, n_embd {TINY_BASE.n_embd}, {TINY_BASE.vocab_size}-piece "
             f"tokenizer, pretrained for {pretrain_args.max_steps} steps on the synthetic corpus"]
    print(write_report(results, out_dir, "LoRA vs DoRA vs LLaMA-Adapter on the synthetic world", notes))
    plot_loss_curves(results[1:], out_dir / "loss_curves.png")
    plot_update(results[1], out_dir / "lora_update_heatmap.png", title="Size of the LoRA update per layer and projection")
    plot_update(results[2], out_dir / "dora_update_heatmap.png",
                title="DoRA: size of the update of the direction per layer")
    print(f"wrote {out_dir / 'comparison.md'}, {out_dir / 'loss_curves.png'}, {out_dir / 'lora_update_heatmap.png'} "
          f"and {out_dir / 'dora_update_heatmap.png'}")

    banner(7, "LoRA merged into the base, and a held-out instruction answered")
    lora_path = results[1].weights_path
    merged_dir, _ = merge_into_checkpoint(checkpoint_dir, lora_path, out_dir / "merged", overwrite=True)
    print(f"merged {lora_path} into {merged_dir}")
    question = world.test[-1]
    print(f"\nthe base with the LoRA file (as generate/lora.py runs it) answers {question.instruction!r} "
          f"(expected {question.answer!r}):")
    answer = answer_with_each(checkpoint_dir, [lora_path], "lora", question.instruction, merge=True, temperature=0.0,
                              max_new_tokens=16, device=device.type, dtype="float32")[0]
    merged = load_checkpoint(merged_dir, device=device).eval()
    prompt_ids = tokenizer.encode(style.format(question.instruction), bos=True)
    merged_ids = generate(merged, prompt_ids, 16, temperature=0.0, eos_id=tokenizer.stop_ids)[len(prompt_ids):]
    merged_answer = tokenizer.decode(merged_ids.tolist())
    print(f"the merged checkpoint {merged_dir} answers {merged_answer!r}: "
          f"{'the same' if merged_answer.strip() == answer.strip() else 'NOT the same'} as the base with the LoRA file")

    print(f"\nquickstart finished in {time.perf_counter() - start:.0f} s; everything is in {out_dir}")
    return {"accuracy": {result.name: result.accuracy.accuracy for result in results}, "out_dir": out_dir}


if __name__ == "__main__":
    run(main)
