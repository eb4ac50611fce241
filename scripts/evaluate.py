"""Step 5 (to evaluate): score a model with EleutherAI's lm-evaluation-harness, or its perplexity on held-out text.

    python scripts/evaluate.py --checkpoint_dir checkpoints/meta-llama/Llama-2-7b-hf \
        --lora_path out/lora/alpaca/lit_lora.safetensors --tasks hellaswag,arc_easy --limit 200 --out_dir out/eval
    python scripts/evaluate.py --checkpoint_dir ... --perplexity data/alpaca        # a prepared validation set
    python scripts/evaluate.py --checkpoint_dir ... --perplexity notes.txt          # any UTF-8 text

Writes out_dir/results.json (the harness's results) and out_dir/results.md (a short table). The harness
is an optional extra: pip install -e ".[eval]". Its standard tasks download their data from the Hugging
Face Hub; local tasks (a YAML and a data file, see howto/evaluate.md) run offline with --include_path.
"""

import importlib.util
import json
from pathlib import Path
from typing import Dict, List, Optional, Union

from lit_lora.evaluation.evaluate import INSTALL_HINT, perplexity_of_prepared, perplexity_of_text, results_table, run_tasks
from lit_lora.files.checkpoint import atomic_path, save_json
from lit_lora.tokenizer import Tokenizer
from lit_lora.workflows.cli import run
from lit_lora.workflows.inference import apply_adapter_file, blame_weights, load_for_generation


def main(
    checkpoint_dir: Path = Path("checkpoints/meta-llama/Llama-2-7b-hf"),
    lora_path: Optional[Path] = None,
    adapter_path: Optional[Path] = None,
    merge: bool = True,
    tasks: Union[str, List[str]] = (),
    num_fewshot: Optional[int] = None,
    limit: Optional[int] = None,
    batch_size: int = 4,
    include_path: Optional[Path] = None,
    perplexity: Optional[Path] = None,
    out_dir: Path = Path("out/eval"),
    device: str = "auto",
    dtype: str = "auto",
) -> Dict[str, float]:
    """Evaluate a lit-lora checkpoint, with or without a LoRA or LLaMA-Adapter file.

    Args:
        checkpoint_dir: the model (or the base the adapter was trained on).
        lora_path: a LoRA (or DoRA) file from finetune/lora.py.
        adapter_path: a LLaMA-Adapter file from finetune/adapter.py.
        merge: fold the LoRA update into the weights first (the same scores, faster).
        tasks: lm-eval task names, comma-separated or a list (e.g. hellaswag,arc_easy).
        num_fewshot: examples shown before each question (the task's default if not given).
        limit: at most this many examples per task (for a quick look; the score then is not the task's).
        batch_size: sequences per forward pass when scoring.
        include_path: a folder of your own task YAMLs.
        perplexity: a prepared data directory (its validation split) or a text file.
        out_dir: where results.json and results.md go.
        device: "auto", "cpu", "cuda" or "cuda:N".
        dtype: "auto", "float32", "bfloat16" or "float16".
    """
    tasks = [t for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t]
    if not tasks and perplexity is None:
        raise ValueError("nothing to evaluate: give --tasks and/or --perplexity")
    if tasks and importlib.util.find_spec("lm_eval") is None:  # before loading a model for nothing
        raise ValueError(INSTALL_HINT)
    tokenizer = Tokenizer(checkpoint_dir)
    model = load_for_generation(checkpoint_dir, device, dtype)
    apply_adapter_file(model, lora_path, adapter_path, merge)
    scores: Dict[str, float] = {}
    if perplexity is not None:
        perplexity = Path(perplexity)
        with blame_weights(checkpoint_dir, lora_path, adapter_path):
            scores["perplexity"] = (perplexity_of_prepared(model, perplexity, batch_size=batch_size) if perplexity.is_dir()
                                    else perplexity_of_text(model, tokenizer, perplexity))
        print(f"perplexity on {perplexity}: {scores['perplexity']:.4f}")
    if tasks:
        results = run_tasks(model, tokenizer, tasks, num_fewshot, limit, batch_size, include_path)
        table = results_table(results)
        save_json(json.loads(json.dumps(results, default=str)), Path(out_dir) / "results.json")
        with atomic_path(Path(out_dir) / "results.md") as tmp:
            tmp.write_text(table + "\n")
        print(table)
        scores.update({task: metrics.get("acc,none") for task, metrics in results["results"].items()
                       if isinstance(metrics.get("acc,none"), float)})
    if scores:
        save_json(scores, Path(out_dir) / "scores.json")
        print(f"wrote {Path(out_dir) / 'scores.json'}")
    return scores


if __name__ == "__main__":
    run(main)
