"""Compare finetuning methods on the same model, data and budget: the measurements, the table, the plots.

    for each method of the registry (lit_lora/methods.py: LoRA, LLaMA-Adapter, full finetuning, LoRA
    variants, any method registered there):
        finetune exactly as its finetune script does (`methods.finetune`): same data order (seed),
        same number of steps and batch size; each method keeps its own learning rate
        measure: trainable parameters, adapter file size, peak memory, seconds per step, final val loss
    score held-out instructions by exact match (greedy decoding), the base model included
    write comparison.md (the table) and PNGs: the loss curves of all methods on one figure, and for a
    method that can measure its update (LoRA), a heatmap of its size ||(alpha / r) B A|| per layer

`compare_methods` runs it all; scripts/compare.py is its command line, and scripts/quickstart.py runs
the same pieces on SmolLM2-135M-Instruct and the date task (lit_lora/evaluation/dates.py), or with --tiny
on the synthetic world (lit_lora/evaluation/synthetic.py).
"""

import gc
import json
import multiprocessing
import re
import resource
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from lit_lora.data import load_prepare_config
from lit_lora.files.checkpoint import atomic_path, load_checkpoint, load_json, recorded_prompt_style, save_json
from lit_lora.files.plots import plot_loss_curves, plot_update_heatmap
from lit_lora.files.run_dir import FINISHED_NAME
from lit_lora.files.utils import PathLike
from lit_lora.generate import generate
from lit_lora.lora import LoRAConfig
from lit_lora.methods import METHODS, apply_weights
from lit_lora.methods import finetune as finetune_method
from lit_lora.methods import get_method, read_weights
from lit_lora.model import Llama
from lit_lora.prompts import PromptStyle, get_prompt_style
from lit_lora.tokenizer import Tokenizer
from lit_lora.train import TrainArgs


# ----------------------------------------------------------------------------------------------------
# Peak memory of one run
# ----------------------------------------------------------------------------------------------------


def _resident_peak_kb() -> Optional[int]:
    try:
        match = re.search(r"^VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


@contextmanager
def measure_peak_memory(device: torch.device) -> Iterator[Dict[str, Any]]:
    """Peak memory while the block runs, in GB, put into the yielded dict as "gb" and "kind".

    CUDA: the most memory PyTorch held allocated (statistics reset on entry). CPU (Linux): the peak
    resident set size of the whole process (reset on entry through /proc/self/clear_refs), so it
    includes the Python interpreter and libraries, ~0.5 GB; where the reset is not allowed, the peak
    since the process started."""
    result: Dict[str, Any] = {}
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    else:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # "5": reset the peak RSS to the current RSS
        except OSError:
            pass
    try:
        yield result
    finally:
        if device.type == "cuda":
            result.update(gb=torch.cuda.max_memory_allocated(device) / 1e9, kind="GPU")
        else:
            peak_kb = _resident_peak_kb() or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux
            result.update(gb=peak_kb / 1e6, kind="RSS")


# ----------------------------------------------------------------------------------------------------
# Finetuning runs
# ----------------------------------------------------------------------------------------------------


@dataclass
class RunResult:
    """What one method's run measured. `metrics` is what lit_lora.train.fit returned."""

    name: str
    method: str  # a method of lit_lora/methods.py, or "base" (no finetuning)
    out_dir: Optional[Path] = None
    metrics: Dict[str, Any] = field(default_factory=dict)
    peak_memory: Optional[Dict[str, Any]] = None
    history: List[Dict[str, float]] = field(default_factory=list)
    accuracy: Optional["ExactMatch"] = None
    task_scores: Dict[str, Optional[float]] = field(default_factory=dict)  # lm-eval task -> accuracy

    @property
    def weights_path(self) -> Optional[Path]:
        """What the run saved: the adapter file, or the finetuned checkpoint directory ("full")."""
        if self.out_dir is None or self.method not in METHODS:
            return None
        return self.out_dir / METHODS[self.method].weights_name

    def weights_bytes(self) -> Optional[int]:
        path = self.weights_path
        if path is None or not path.exists():
            return None
        return sum(p.stat().st_size for p in path.iterdir()) if path.is_dir() else path.stat().st_size


BLOCK_LINEAR = ("q", "k", "v", "o", "mlp")  # every linear layer of the blocks (QLoRA's "all linear layers")
LORA_SWEEP = ("lora-r8-qv", "lora-r8-all", "lora-r64-qv", "lora-r64-all")


@dataclass
class Variant:
    """One entry of a comparison: a method and the settings it runs with."""

    name: str
    method: str  # a method of lit_lora/methods.py
    settings: Dict[str, Any] = field(default_factory=dict)  # e.g. {"lora": LoRAConfig(...)}; empty: the method's defaults


def parse_variant(spec: str) -> Variant:
    """A registered method's name (its default settings); "dora" (LoRA's defaults with DoRA); or
    "lora-r<rank>-<qv|all>" with optional suffixes "-rs" (rsLoRA, alpha 16 at every rank), "-dora" and
    "-plus" (LoRA+, lr_ratio 16): LoRA of that rank (alpha = 2 x rank, dropout 0.05) on q_proj and v_proj,
    or on every linear layer of the blocks, e.g. "lora-r64-all-rs"."""
    if spec in METHODS:
        return Variant(spec, spec)
    if spec == "dora":
        return Variant(spec, "lora", {"lora": LoRAConfig(use_dora=True)})
    match = re.fullmatch(r"lora-r(\d+)-(qv|all)((?:-rs|-dora|-plus)*)", spec)
    if not match:
        raise ValueError(f"unknown method {spec!r}: use {', '.join(METHODS)}, dora, or lora-r<rank>-<qv|all> with "
                         "optional -rs, -dora, -plus (e.g. lora-r64-all-rs)")
    rank, options = int(match.group(1)), match.group(3).split("-")[1:]
    targets = ("q", "v") if match.group(2) == "qv" else BLOCK_LINEAR
    alpha = 16.0 if "rs" in options else 2 * rank  # rsLoRA keeps alpha fixed: the scale is 16 / sqrt(r)
    return Variant(spec, "lora", {"lora": LoRAConfig(r=rank, alpha=alpha, dropout=0.05, targets=targets,
                                                     use_rslora="rs" in options, use_dora="dora" in options,
                                                     lr_ratio=16.0 if "plus" in options else None)})


def _finetune_measured(method: str, arguments: Dict[str, Any], device_type: str) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """In a fresh process: (the run's metrics, its peak memory over what the process held before it began)."""
    device = torch.device(device_type)
    before_gb = (_resident_peak_kb() or 0) / 1e6 if device.type == "cpu" else 0.0  # Python, torch, Lightning
    with measure_peak_memory(device) as peak:
        metrics = finetune_method(method, arguments)
    peak["gb"] = max(0.0, peak["gb"] - before_gb)
    return metrics, peak


def _finetune_in_child(connection: Any, method: str, arguments: Dict[str, Any], device_type: str) -> None:
    """The child's side: send ("done", (metrics, peak)) or ("error", the exception) back to the parent."""
    try:
        connection.send(("done", _finetune_measured(method, arguments, device_type)))
    except BaseException as error:  # the parent raises it (a one-line error stays one line)
        try:
            connection.send(("error", error))
        except Exception:  # an exception that does not pickle
            connection.send(("error", RuntimeError(f"{type(error).__name__}: {error}")))
    finally:
        connection.close()


FRESH_PROCESS_METHODS = frozenset(METHODS)  # the methods lit_lora.methods registers when a process imports it
PEAK_MEMORY_NOTE = ("peak memory: each method trained in a fresh process of its own; the peak resident set size "
                    "less what that process held before training (Python and libraries)",
                    "peak memory: GPU memory allocated, each method trained in a fresh process of its own")
STEP_SECONDS_NOTE = "s / step: the median over the steps after the first, and their range (min-max)"


def finetune(variant: Variant, out_dir: PathLike, device: torch.device, **arguments: Any) -> RunResult:
    """Finetune `variant` as its finetune script would, with `arguments` (checkpoint_dir, data_dir, train,
    overwrite, ...), and measure its peak memory; returns the run's metrics and loss history.

    The run happens in a child process of its own, so the peak is this method's alone: in one process,
    every run would report the peak of the largest run before it (CPU memory freed by a run stays with
    the process, see speed.training.keep_freed_memory_for_reuse). On a CPU it is the child's peak resident
    memory less what the child held before training (the interpreter and libraries)."""
    out_dir = Path(out_dir)
    arguments = {"out_dir": out_dir, **variant.settings, **arguments}
    if variant.method not in FRESH_PROCESS_METHODS:  # registered in this process only: a fresh one lacks it
        with measure_peak_memory(device) as peak:
            metrics = finetune_method(variant.method, arguments)
        return _run_result(variant, out_dir, metrics, peak)
    context = multiprocessing.get_context("spawn")  # a fresh process, not a copy of this one
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=_finetune_in_child, args=(sender, variant.method, arguments, device.type))
    child.start()
    sender.close()  # the child holds the only writing end: a child that dies ends the pipe
    try:
        kind, value = receiver.recv()
    except EOFError:
        kind, value = "error", RuntimeError(f"{variant.name}: the training process died (exit code "
                                            f"{child.join() or child.exitcode}) before it reported")
    finally:
        child.join()
    if kind == "error":
        raise value
    metrics, peak = value
    return _run_result(variant, out_dir, metrics, peak)


def _run_result(variant: Variant, out_dir: Path, metrics: Dict[str, Any], peak: Dict[str, Any]) -> RunResult:
    if not metrics.get("finished"):
        raise RuntimeError(f"{variant.name}: training stopped at step {metrics['steps']} of {metrics['total_steps']}")
    history = json.loads((out_dir / "history.json").read_text())["history"]
    return RunResult(variant.name, variant.method, out_dir, metrics, peak, history)


def load_finished_run(out_dir: PathLike, name: Optional[str] = None) -> RunResult:
    """A run finished earlier by a finetune script (e.g. full finetuning on several GPUs), read from its
    out_dir: final_metrics.json, history.json, and the method from the weights it saved."""
    out_dir = Path(out_dir)
    methods = [name for name, method in METHODS.items() if (out_dir / method.weights_name).exists()]
    if not (out_dir / FINISHED_NAME).is_file() or len(methods) != 1:
        raise FileNotFoundError(f"{out_dir} holds no finished finetuning run ({FINISHED_NAME} and one of "
                                f"{', '.join(m.weights_name for m in METHODS.values())} expected)")
    metrics = load_json(out_dir / FINISHED_NAME)
    history = load_json(out_dir / "history.json")["history"] if (out_dir / "history.json").is_file() else []
    peak = re.search(r"peak (GPU memory|RSS) ([0-9.]+) GB", str(metrics.get("peak_memory", "")))
    peak_memory = {"gb": float(peak.group(2)), "kind": "GPU" if peak.group(1) == "GPU memory" else "RSS"} if peak else None
    return RunResult(name or out_dir.name, methods[0], out_dir, metrics, peak_memory, history)


def load_finetuned(result: RunResult, checkpoint_dir: PathLike, device: torch.device,
                   dtype: Optional[torch.dtype] = None) -> Llama:
    """The model a run produced, in eval mode: the base with its weights file applied, or the checkpoint
    the method saved (full finetuning)."""
    if result.method != "base" and not get_method(result.method).saves_file:
        return load_checkpoint(result.weights_path, dtype=dtype, device=device).eval()
    model = load_checkpoint(checkpoint_dir, dtype=dtype, device=device)
    if result.method != "base":
        apply_weights(model, result.weights_path, result.method)
    return model.eval()


def trained_prompt_style(result: RunResult) -> Optional[str]:
    """The prompt style a run's weights record (its adapter file, or a full checkpoint's training.json)."""
    if result.weights_path is None or not result.weights_path.exists():
        return None
    if get_method(result.method).saves_file:
        return read_weights(result.weights_path, result.method).prompt_style
    return recorded_prompt_style(result.weights_path)


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------
# Exact-match accuracy on held-out instructions
# ----------------------------------------------------------------------------------------------------


def load_eval_records(path: PathLike) -> List[Dict[str, str]]:
    """Instruction/answer pairs: a JSON list of objects with "instruction", optional "input", and the
    expected answer as "output" (Alpaca) or "answer"; an optional "task" groups the scores."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"eval file not found: {path}")
    try:
        records = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error})") from None
    if not isinstance(records, list) or not records:
        raise ValueError(f"{path}: expected a non-empty JSON list of {{instruction, output}} objects")
    checked = []
    for number, record in enumerate(records, start=1):
        answer = record.get("output", record.get("answer")) if isinstance(record, dict) else None
        if not isinstance(answer, str) or not isinstance(record.get("instruction"), str):
            raise ValueError(f"{path}: record {number} needs string fields 'instruction' and 'output' (or 'answer')")
        checked.append({"instruction": record["instruction"], "input": record.get("input") or "", "answer": answer,
                        "task": str(record.get("task", "all"))})
    return checked


@dataclass
class ExactMatch:
    correct: int
    total: int
    per_task: Dict[str, Tuple[int, int]]  # task -> (correct, total)
    predictions: List[Dict[str, Any]]  # task, instruction, input, answer, prediction, correct

    @property
    def accuracy(self) -> float:
        return self.correct / max(1, self.total)

    def right_but_misformatted(self) -> int:
        """Wrong answers that start with the expected one ("15." or "15 equals" for "15"): the model knew
        the answer but not the format."""
        return sum(not row["correct"] and row["prediction"].strip().startswith(row["answer"].strip())
                   for row in self.predictions)


@torch.no_grad()
def exact_match(model: Llama, tokenizer: Tokenizer, style: PromptStyle, records: Sequence[Dict[str, str]],
                max_new_tokens: int = 16, batch_size: int = 64) -> ExactMatch:
    """Answer every record greedily (lit_lora.generate, temperature 0, stop at EOS) and count the answers
    equal to the expected one, ignoring surrounding whitespace only: "12." is not "12".

    Prompts of equal token length are generated together (generate() takes a batch of equal-length
    prompts; the model has no padding mask)."""
    device = model.tok_embeddings.weight.device
    prompts = [tokenizer.encode(style.format(r["instruction"], r.get("input", "")), bos=True) for r in records]
    by_length: Dict[int, List[int]] = {}
    for index, ids in enumerate(prompts):
        by_length.setdefault(len(ids), []).append(index)
    predictions: List[str] = [""] * len(records)
    for length, indices in sorted(by_length.items()):
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            batch = torch.stack([prompts[i] for i in chunk]).to(device)  # (B, T)
            output = generate(model, batch, max_new_tokens, temperature=0.0, eos_id=tokenizer.stop_ids)
            for row, index in zip(output[:, length:].tolist(), chunk):
                ends = [position for position, token in enumerate(row) if token in tokenizer.stop_ids]
                new = row[: ends[0]] if ends else row
                predictions[index] = tokenizer.decode(new)
    rows, per_task = [], {}
    for record, prediction in zip(records, predictions):
        correct = prediction.strip() == record["answer"].strip()
        task = record.get("task", "all")
        hits, seen = per_task.get(task, (0, 0))
        per_task[task] = (hits + correct, seen + 1)
        rows.append({"task": task, "instruction": record["instruction"], "input": record.get("input", ""),
                     "answer": record["answer"], "prediction": prediction, "correct": correct})
    return ExactMatch(sum(r["correct"] for r in rows), len(rows), per_task, rows)


# ----------------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------------


def _size(n_bytes: Optional[int]) -> str:
    if n_bytes is None:
        return "-"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.1f} {unit}"
    return f"{n_bytes} B"


def _step_seconds(metrics: Dict[str, Any]) -> str:
    """The median seconds per step and their range (min-max) over the steps after the first, or the mean
    where a run recorded only that."""
    if "step_seconds" not in metrics:
        return f"{metrics['seconds_per_step']:.3f}"
    median, low, high = (metrics["step_seconds"][key] for key in ("median", "min", "max"))
    return f"{median:.3f} ({low:.3f}-{high:.3f})"


def comparison_rows(results: Sequence[RunResult]) -> List[Dict[str, str]]:
    """One dict of formatted cells per run (the table's rows, also saved as JSON)."""
    rows = []
    for result in results:
        m = result.metrics
        trained = result.method != "base"
        accuracy = result.accuracy
        rows.append({
            "method": result.name,
            "trainable params": f"{m['trainable_parameters']:,}" if trained else "0",
            "% of total": f"{100 * m['trainable_parameters'] / m['total_parameters']:.2f} %" if trained else "0 %",
            "adapter file": _size(result.weights_bytes()) if trained else "-",
            "peak memory": f"{result.peak_memory['gb']:.2f} GB {result.peak_memory['kind']}" if result.peak_memory else "-",
            "s / step": _step_seconds(m) if trained else "-",
            "final val loss": f"{m['val_loss']:.4f}" if "val_loss" in m else "-",
            "val perplexity": f"{m['val_ppl']:.2f}" if "val_ppl" in m else "-",
            "accuracy": (f"{100 * accuracy.accuracy:.1f} % ({accuracy.correct}/{accuracy.total})"
                         if accuracy is not None else "-"),
            **{task: "-" if score is None else f"{100 * score:.1f} %" for task, score in result.task_scores.items()},
        })
    return rows


def markdown_table(rows: Sequence[Dict[str, str]]) -> str:
    """The rows as a Markdown table, the first column (the method) left-aligned, the numbers right-aligned."""
    headers = list(rows[0])
    lines = ["| " + " | ".join(headers) + " |", "|---|" + "---:|" * (len(headers) - 1)]  # numbers right-aligned
    lines += ["| " + " | ".join(row[h] for h in headers) + " |" for row in rows]
    return "\n".join(lines)


def per_task_table(results: Sequence[RunResult]) -> Optional[str]:
    """Accuracy per task (columns) and method (rows), when the eval records name more than one task."""
    scored = [r for r in results if r.accuracy is not None]
    tasks = sorted({task for r in scored for task in r.accuracy.per_task})
    if len(tasks) < 2:
        return None
    lines = ["| method | " + " | ".join(tasks) + " |", "|---|" + "---:|" * len(tasks)]
    for result in scored:
        cells = []
        for task in tasks:
            hits, seen = result.accuracy.per_task.get(task, (0, 0))
            cells.append(f"{100 * hits / seen:.0f} %" if seen else "-")
        lines.append(f"| {result.name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def side_by_side(results: Sequence[RunResult], count: int = 6) -> Optional[str]:
    """The first `count` held-out prompts with the expected answer and each model's answer, as a Markdown
    table (None before any model is scored). A wrong answer is marked with a cross."""
    scored = [r for r in results if r.accuracy is not None]
    if not scored:
        return None

    def cell(text: str) -> str:  # one table cell: no line breaks, no column separators
        return " ".join(text.split()).replace("|", "\\|") or "(nothing)"

    lines = ["| prompt | expected | " + " | ".join(r.name for r in scored) + " |", "|---|---|" + "---|" * len(scored)]
    for index, first in enumerate(scored[0].accuracy.predictions[:count]):
        answers = [r.accuracy.predictions[index] for r in scored]
        lines.append(f"| {cell(first['input'] or first['instruction'])} | {cell(first['answer'])} | " + " | ".join(
            cell(a["prediction"]) + ("" if a["correct"] else " ✗") for a in answers) + " |")
    return "\n".join(lines)


def write_report(results: Sequence[RunResult], out_dir: PathLike, title: str, notes: Sequence[str] = ()) -> str:
    """comparison.md (table, per-task accuracy, a few answers side by side, notes), comparison.json
    (numbers and every prediction)."""
    out_dir = Path(out_dir)
    rows = comparison_rows(results)
    text = [f"# {title}", "", markdown_table(rows), ""]
    by_task = per_task_table(results)
    if by_task:
        text += ["Exact-match accuracy per task:", "", by_task, ""]
    answers = side_by_side(results)
    if answers:
        text += ["The first held-out prompts, answered by each model (✗: not an exact match):", "", answers, ""]
    text += [f"- {note}" for note in notes]
    report = "\n".join(text).rstrip() + "\n"
    with atomic_path(out_dir / "comparison.md") as tmp:
        tmp.write_text(report)
    save_json({"rows": rows, "runs": [{
        "name": r.name, "method": r.method, "out_dir": str(r.out_dir) if r.out_dir else None,
        "metrics": {k: v for k, v in r.metrics.items() if isinstance(v, (int, float, str, bool)) or v is None},
        "peak_memory": r.peak_memory, "adapter_bytes": r.weights_bytes(),
        "accuracy": None if r.accuracy is None else {"correct": r.accuracy.correct, "total": r.accuracy.total,
                                                      "per_task": r.accuracy.per_task,
                                                      "predictions": r.accuracy.predictions},
    } for r in results]}, out_dir / "comparison.json")
    return report


def plot_update(result: RunResult, path: PathLike, title: str = "") -> Optional[Path]:
    """A heatmap of where `result`'s method changed the model, for methods that measure their update
    (LoRA: (alpha / r) ||B A|| per layer and projection); None for the others."""
    method = METHODS.get(result.method)
    if method is None or method.update_norms is None or result.weights_path is None:
        return None
    weights = read_weights(result.weights_path, method)
    rows, columns, norms = method.update_norms(weights.config, weights.model_config, weights.tensors)
    return plot_update_heatmap(rows, columns, norms, path, title or f"{result.name}: size of the update per layer")


# ----------------------------------------------------------------------------------------------------
# The whole comparison
# ----------------------------------------------------------------------------------------------------


def compare_methods(checkpoint_dir: PathLike, data_dir: PathLike, out_dir: PathLike, variants: Sequence[Variant],
                    budget: Dict[str, Any], include: Sequence[PathLike] = (), learning_rates: Optional[Dict[str, float]] = None,
                    eval_file: Optional[PathLike] = None, max_new_tokens: int = 64, precision: Optional[str] = None,
                    accelerator: str = "auto", overwrite: bool = False, tasks: Sequence[str] = (),
                    task_limit: Optional[int] = None, include_path: Optional[PathLike] = None,
                    compile_model: bool = False) -> str:
    """Finetune every variant on the same `budget` (TrainArgs fields: max_steps, global_batch_size, seed,
    ...), each with its method's own learning rate unless `learning_rates` names one; add the runs of
    `include`; score every model (the base too) on `eval_file` by exact match; write comparison.md,
    comparison.json, loss_curves.png and the update heatmaps to `out_dir`. A run directory holding an earlier
    run is refused unless `overwrite`. With `tasks`, every model is also scored on those lm-eval tasks
    (lit_lora/evaluation/evaluate.py; `task_limit` examples each), one column per task. `compile_model` trains every
    variant compiled (finetune --compile). Returns the report."""
    learning_rates = dict(learning_rates or {})
    names = [variant.name for variant in variants] + [str(path) for path in include]
    if len(set(names)) != len(names):
        raise ValueError(f"a method is listed twice: {names}")
    unknown = sorted(set(learning_rates) - set(METHODS))
    if unknown:
        raise ValueError(f"--learning_rates: unknown methods {unknown}; use {', '.join(METHODS)}")
    records = load_eval_records(eval_file) if eval_file is not None else None  # fail early on a bad file
    finished = [load_finished_run(path, name=str(path)) for path in include]
    if not variants and not finished:
        raise ValueError("nothing to compare: give --methods, --lora_sweep or --include")
    device = torch.device("cuda" if accelerator != "cpu" and torch.cuda.is_available() else "cpu")
    out_dir = Path(out_dir)

    results: List[RunResult] = []
    for variant in variants:
        recipe = TrainArgs(**get_method(variant.method).recipe)  # the method's own learning rate and weight decay
        train = replace(recipe, **budget, learning_rate=learning_rates.get(variant.method, recipe.learning_rate))
        print(f"\n=== {variant.name}: {train.max_steps} steps of {train.global_batch_size}, learning rate "
              f"{train.learning_rate:g} ===", flush=True)
        results.append(finetune(variant, out_dir / variant.name, device, checkpoint_dir=checkpoint_dir,
                                data_dir=data_dir, train=train, precision=precision, accelerator=accelerator,
                                overwrite=overwrite, compile=compile_model))
        release_memory()
    results += finished

    if records is not None or tasks:
        tokenizer = Tokenizer(checkpoint_dir)
        data_style = load_prepare_config(data_dir)["prompt_style"]
        results.insert(0, RunResult("base model (no finetuning)", "base"))
        for result in results:
            dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
            model = load_finetuned(result, checkpoint_dir, device, dtype=dtype)
            if records is not None:
                style = get_prompt_style(trained_prompt_style(result) or data_style)  # an --include run may differ
                result.accuracy = exact_match(model, tokenizer, style, records, max_new_tokens=max_new_tokens)
                print(f"{result.name}: {100 * result.accuracy.accuracy:.1f} % exact match "
                      f"({result.accuracy.correct}/{result.accuracy.total})", flush=True)
            if tasks:
                from lit_lora.evaluation.evaluate import main_metric, run_tasks  # the optional harness, only when asked

                scores = run_tasks(model, tokenizer, tasks, limit=task_limit, include_path=include_path)
                result.task_scores = {task: main_metric(scores, task) for task in tasks}
                print(f"{result.name}: {result.task_scores}", flush=True)
            del model
            release_memory()

    notes = [f"checkpoint {checkpoint_dir}, data {data_dir}; {budget.get('max_steps')} steps of "
             f"{budget.get('global_batch_size')} samples in the same order (seed {budget.get('seed')}) for every "
             "method trained here"]
    notes.append(f"accuracy: exact match on {len(records)} instructions of {eval_file}, greedy decoding"
                 if records is not None else "no --eval_file: compare the final validation loss")
    notes += [PEAK_MEMORY_NOTE[device.type == "cuda"], STEP_SECONDS_NOTE]
    report = write_report(results, out_dir, f"Finetuning methods compared on {Path(checkpoint_dir).name}", notes)
    plot_loss_curves(results, out_dir / "loss_curves.png")
    for result in results:
        file_name = "".join(c if c.isalnum() or c in "-." else "_" for c in result.name)
        plot_update(result, out_dir / f"{result.method}_update_heatmap_{file_name}.png")
    return report
