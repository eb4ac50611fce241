"""Evaluating a lit-lora model: perplexity on held-out text, and lm-evaluation-harness tasks.

    perplexity = exp(mean over predicted tokens of -log P(token | the tokens before it))

`perplexity_of_prepared` takes the tokens training learns (the responses of a prepared validation set),
token-weighted as training's validation loss is; `perplexity_of_text` a plain text file, in
windows of the model's context. `run_tasks` hands the model to EleutherAI's harness
(lit_lora/evaluation/lm_eval_model.py), an optional extra: `pip install -e ".[eval]"`.
"""

import math
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from lit_lora.data import IGNORE_INDEX, BatchSampler, collate, load_prepared_split
from lit_lora.files.utils import PathLike
from lit_lora.generate import NonFiniteLogits
from lit_lora.model import Llama
from lit_lora.tokenizer import Tokenizer


INSTALL_HINT = 'lm-eval is not installed: pip install -e ".[eval]" (or pip install lm-eval)'


@torch.inference_mode()
def summed_loss(model: Llama, input_ids: torch.Tensor, labels: torch.Tensor) -> Tuple[float, int]:
    """(sum of -log P over the counted next-token predictions, how many) for (B, T) ids and labels."""
    logits = model(input_ids.to(model.tok_embeddings.weight.device)).float()  # (B, T, V)
    targets = labels[:, 1:].to(logits.device)  # position t predicts token t + 1
    total = F.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    return float(total), int((targets != IGNORE_INDEX).sum())


def finite_perplexity(nll: float, count: int) -> float:
    """exp(mean -log P), or a `NonFiniteLogits` error when the model's scores were NaN or infinite (weights
    that overflow when used): a perplexity of NaN is no measurement."""
    if not math.isfinite(nll):
        raise NonFiniteLogits("the model's logits are NaN or infinite, so there is no perplexity: its weights "
                              "overflow when used (in float16, --dtype float32 may help) or are damaged")
    return math.exp(nll / max(count, 1))


def perplexity_of_prepared(model: Llama, prepared_dir: PathLike, split: str = "val", batch_size: int = 4) -> float:
    """Perplexity over the learned tokens of a prepared split (the labels training counts)."""
    samples = load_prepared_split(prepared_dir, split, model.config.vocab_size)
    if not samples:
        raise ValueError(f"{prepared_dir} has no {split} samples to measure perplexity on")
    sampler = BatchSampler([len(s["input_ids"]) for s in samples], batch_size, shuffle=False, seed=0)
    nll, count = 0.0, 0
    for indices in sampler.batches(0):
        batch = collate([samples[i] for i in indices])
        batch_nll, batch_count = summed_loss(model, batch["input_ids"], batch["labels"])
        nll, count = nll + batch_nll, count + batch_count
    return finite_perplexity(nll, count)


def perplexity_of_text(model: Llama, tokenizer: Tokenizer, path: PathLike) -> float:
    """Perplexity of a UTF-8 text file: BOS + its tokens, in windows of the model's context that overlap by
    one token (each predicts its tokens from the ones before it in the window; every token once)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text (bad byte at offset {error.start}): save it as UTF-8") from None
    ids = tokenizer.encode(text, bos=True)
    if len(ids) < 2:
        raise ValueError(f"{path} holds no text to measure perplexity on")
    nll, count = 0.0, 0
    size = model.config.block_size
    for start in range(0, len(ids) - 1, size - 1):  # each window starts with the last token of the one before
        window = ids[start : start + size][None]  # (1, T): predicts its tokens 1..T-1, each token exactly once
        window_nll, window_count = summed_loss(model, window, window)
        nll, count = nll + window_nll, count + window_count
    return finite_perplexity(nll, count)


def run_tasks(model: Llama, tokenizer: Tokenizer, tasks: Sequence[str], num_fewshot: Optional[int] = None,
              limit: Optional[int] = None, batch_size: int = 1, include_path: Optional[PathLike] = None) -> Dict[str, Any]:
    """The harness's `simple_evaluate` on lit-lora's model class; returns its results dict. Tasks whose
    data is not on this machine (most download from the Hugging Face Hub) fail with a one-line error."""
    try:
        from lm_eval import simple_evaluate
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ValueError(INSTALL_HINT) from None
    from lit_lora.evaluation.lm_eval_model import LitLM  # imports the harness

    manager = TaskManager(include_path=str(include_path) if include_path else None)
    unknown = [task for task in tasks if not manager.match_tasks([task])]
    if unknown:
        raise ValueError(f"unknown lm-eval tasks {unknown}: see `lm-eval --tasks list`, or pass --include_path for yours")
    try:
        return simple_evaluate(model=LitLM(model, tokenizer, batch_size), tasks=list(tasks), num_fewshot=num_fewshot,
                               limit=limit, task_manager=manager, log_samples=False)
    except (ConnectionError, OSError) as error:
        raise ValueError(f"lm-eval could not load a task's data ({type(error).__name__}: "
                         f"{str(error).splitlines()[0][:200]}); without internet only local tasks run") from None


def results_table(results: Dict[str, Any]) -> str:
    """The harness's results as a short Markdown table: task, metric, value, stderr."""
    lines = ["| task | metric | value | stderr |", "|---|---|---:|---:|"]
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not key.endswith("_stderr,none") and "stderr" not in key:
                metric = key.split(",")[0]
                stderr = metrics.get(f"{metric}_stderr,{key.split(',', 1)[1]}" if "," in key else "")
                stderr_text = f"{stderr:.4f}" if isinstance(stderr, (int, float)) else "-"
                lines.append(f"| {task} | {metric} | {value:.4f} | {stderr_text} |")
    return "\n".join(lines)


def main_metric(results: Dict[str, Any], task: str) -> Optional[float]:
    """The first accuracy-like number of a task's results (acc, acc_norm, exact_match, ...)."""
    metrics = results.get("results", {}).get(task, {})
    for name in ("acc,none", "acc_norm,none", "exact_match,none", "mc2,none"):
        if isinstance(metrics.get(name), (int, float)):
            return float(metrics[name])
    return None
