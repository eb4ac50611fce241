"""Compare finetuning methods on the same model, data and budget: the measurements, the table, the plots.

    for each method (LoRA, LLaMA-Adapter, full finetuning, LoRA variants):
        finetune through the method's own script (finetune/<method>.py `main`): same data order (seed),
        same number of steps and batch size; each method keeps its own learning rate
        measure: trainable parameters, adapter file size, peak memory, seconds per step, final val loss
    score held-out instructions by exact match (greedy decoding), the base model included
    write comparison.md (the table) and PNGs: the loss curves of all methods on one figure, and where LoRA
    ran, a heatmap of the size of its update ||(alpha / r) B A|| per layer and projection

scripts/quickstart.py runs this on the synthetic world (lit_lora/synthetic.py); scripts/compare.py on
any checkpoint and prepared dataset.
"""

import gc
import importlib.util
import inspect
import json
import os
import re
import resource
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch

from lit_lora.adapter import apply_adapter_checkpoint
from lit_lora.checkpoint import atomic_path, load_checkpoint, load_json, save_json
from lit_lora.generate import generate
from lit_lora.lora import LLAMA_TARGETS, LoRAConfig, apply_lora_checkpoint, load_lora_checkpoint
from lit_lora.model import Llama
from lit_lora.prompts import PromptStyle
from lit_lora.tokenizer import Tokenizer
from lit_lora.train import FINISHED_NAME, TrainArgs

PathLike = Union[str, Path]
REPO_ROOT = Path(__file__).resolve().parents[1]
METHOD_SCRIPTS = {"lora": "finetune/lora.py", "adapter": "finetune/adapter.py", "full": "finetune/full.py"}
WEIGHTS_NAMES = {"lora": "lit_lora.safetensors", "adapter": "lit_adapter.safetensors", "full": "final"}


def load_script_main(relative_path: str) -> Callable[..., Any]:
    """The `main` function of one of the repository's scripts (finetune/lora.py, scripts/merge_lora.py, ...).

    Scripts are files, not a package; running their `main` in this process, rather than the same library
    calls copied here, guarantees the comparison measures exactly what the scripts do."""
    path = REPO_ROOT / relative_path
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run this from a clone of lit-lora installed with `pip install -e .`")
    spec = importlib.util.spec_from_file_location(f"lit_lora_script_{path.stem}_{path.parent.name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


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
    method: str  # "lora", "adapter", "full" or "base" (no finetuning)
    out_dir: Optional[Path] = None
    metrics: Dict[str, Any] = field(default_factory=dict)
    peak_memory: Optional[Dict[str, Any]] = None
    history: List[Dict[str, float]] = field(default_factory=list)
    accuracy: Optional["ExactMatch"] = None

    @property
    def weights_path(self) -> Optional[Path]:
        """What the run saved: the adapter file, or the finetuned checkpoint directory ("full")."""
        if self.out_dir is None or self.method not in WEIGHTS_NAMES:
            return None
        return self.out_dir / WEIGHTS_NAMES[self.method]

    def weights_bytes(self) -> Optional[int]:
        path = self.weights_path
        if path is None or not path.exists():
            return None
        return sum(p.stat().st_size for p in path.iterdir()) if path.is_dir() else path.stat().st_size


BLOCK_LINEAR = ("q", "k", "v", "o", "mlp")  # every linear layer of the blocks (QLoRA's "all linear layers")
LORA_SWEEP = ("lora-r8-qv", "lora-r8-all", "lora-r64-qv", "lora-r64-all")


@dataclass
class Variant:
    """One entry of a comparison: a method and the settings its script's `main` receives."""

    name: str
    method: str  # "lora", "adapter" or "full"
    settings: Dict[str, Any] = field(default_factory=dict)  # e.g. {"lora": LoRAConfig(...)}; empty: the script's default


def parse_variant(spec: str) -> Variant:
    """"lora", "adapter", "full" (each script's default settings), or "lora-r<rank>-<qv|all>": LoRA of that
    rank (alpha = 2 x rank, dropout 0.05) on q_proj and v_proj, or on every linear layer of the blocks."""
    if spec in METHOD_SCRIPTS:
        return Variant(spec, spec)
    match = re.fullmatch(r"lora-r(\d+)-(qv|all)", spec)
    if not match:
        raise ValueError(f"unknown method {spec!r}: use lora, adapter, full or lora-r<rank>-<qv|all> (e.g. lora-r64-all)")
    rank = int(match.group(1))
    targets = ("q", "v") if match.group(2) == "qv" else BLOCK_LINEAR
    return Variant(spec, "lora", {"lora": LoRAConfig(r=rank, alpha=2 * rank, dropout=0.05, targets=targets)})


def script_recipe(method: str) -> TrainArgs:
    """The TrainArgs a finetune script uses by default (its learning rate, weight decay, batch sizes)."""
    return inspect.signature(load_script_main(METHOD_SCRIPTS[method])).parameters["train"].default


def finetune(variant: Variant, out_dir: PathLike, device: torch.device, **kwargs: Any) -> RunResult:
    """Run finetune/<method>.py's `main(out_dir=..., overwrite=True, **variant.settings, **kwargs)` and
    measure its peak memory; returns the run's metrics and loss history."""
    if variant.method not in METHOD_SCRIPTS:
        raise ValueError(f"unknown method {variant.method!r}; choose one of {', '.join(METHOD_SCRIPTS)}")
    main = load_script_main(METHOD_SCRIPTS[variant.method])
    out_dir = Path(out_dir)
    with measure_peak_memory(device) as peak:
        metrics = main(out_dir=out_dir, overwrite=True, **variant.settings, **kwargs)
    if not metrics.get("finished"):
        raise RuntimeError(f"{variant.name}: training stopped at step {metrics['steps']} of {metrics['total_steps']}")
    history = json.loads((out_dir / "history.json").read_text())["history"]
    return RunResult(variant.name, variant.method, out_dir, metrics, peak, history)


def load_finished_run(out_dir: PathLike, name: Optional[str] = None) -> RunResult:
    """A run finished earlier by finetune/<method>.py (e.g. full finetuning on several GPUs), read from
    its out_dir: final_metrics.json, history.json, and the method from the weights it saved."""
    out_dir = Path(out_dir)
    methods = [method for method, weights in WEIGHTS_NAMES.items() if (out_dir / weights).exists()]
    if not (out_dir / FINISHED_NAME).is_file() or len(methods) != 1:
        raise FileNotFoundError(f"{out_dir} holds no finished finetuning run ({FINISHED_NAME} and one of "
                                f"{', '.join(WEIGHTS_NAMES.values())} expected)")
    metrics = load_json(out_dir / FINISHED_NAME)
    history = load_json(out_dir / "history.json")["history"] if (out_dir / "history.json").is_file() else []
    peak = re.search(r"peak (GPU memory|RSS) ([0-9.]+) GB", str(metrics.get("peak_memory", "")))
    peak_memory = {"gb": float(peak.group(2)), "kind": "GPU" if peak.group(1) == "GPU memory" else "RSS"} if peak else None
    return RunResult(name or out_dir.name, methods[0], out_dir, metrics, peak_memory, history)


def load_finetuned(result: RunResult, checkpoint_dir: PathLike, device: torch.device,
                   dtype: Optional[torch.dtype] = None) -> Llama:
    """The model a run produced, in eval mode: the base with its adapter applied, or the full checkpoint."""
    if result.method == "full":
        model = load_checkpoint(result.weights_path, dtype=dtype, device=device)
    else:
        model = load_checkpoint(checkpoint_dir, dtype=dtype, device=device)
        if result.method == "lora":
            apply_lora_checkpoint(model, result.weights_path)
        elif result.method == "adapter":
            apply_adapter_checkpoint(model, result.weights_path)
    return model.eval()


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
    predictions: List[Dict[str, Any]]  # instruction, answer, prediction, correct

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
            output = generate(model, batch, max_new_tokens, temperature=0.0, eos_id=tokenizer.eos_id)
            for row, index in zip(output[:, length:].tolist(), chunk):
                new = row[: row.index(tokenizer.eos_id)] if tokenizer.eos_id in row else row
                predictions[index] = tokenizer.decode(new)
    rows, per_task = [], {}
    for record, prediction in zip(records, predictions):
        correct = prediction.strip() == record["answer"].strip()
        task = record.get("task", "all")
        hits, seen = per_task.get(task, (0, 0))
        per_task[task] = (hits + correct, seen + 1)
        rows.append({"task": task, "instruction": record["instruction"], "answer": record["answer"],
                     "prediction": prediction, "correct": correct})
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
            "s / step": f"{m['seconds_per_step']:.3f}" if trained else "-",
            "final val loss": f"{m['val_loss']:.4f}" if "val_loss" in m else "-",
            "accuracy": (f"{100 * accuracy.accuracy:.1f} % ({accuracy.correct}/{accuracy.total})"
                         if accuracy is not None else "-"),
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


def write_report(results: Sequence[RunResult], out_dir: PathLike, title: str, notes: Sequence[str] = ()) -> str:
    """comparison.md (table, per-task accuracy, notes), comparison.json (numbers and every prediction)."""
    out_dir = Path(out_dir)
    rows = comparison_rows(results)
    text = [f"# {title}", "", markdown_table(rows), ""]
    by_task = per_task_table(results)
    if by_task:
        text += ["Exact-match accuracy per task:", "", by_task, ""]
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


# ----------------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_figure(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp.png")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(tmp, dpi=120)
    _pyplot().close(fig)
    os.replace(tmp, path)


def plot_loss_curves(results: Sequence[RunResult], path: PathLike,
                     title: str = "Finetuning loss: training (thin) and validation (dots)") -> Path:
    """Training loss (thin) and validation loss (dots) of every run, one colour per method, on one figure."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for index, result in enumerate(r for r in results if r.history):
        color = f"C{index}"
        train = [(h["step"], h["train_loss"]) for h in result.history if "train_loss" in h]
        val = [(h["step"], h["val_loss"]) for h in result.history if "val_loss" in h]
        if train:
            ax.plot(*zip(*train), color=color, linewidth=0.8, alpha=0.45)
        if val:
            ax.plot(*zip(*val), "o-", color=color, linewidth=1.8, markersize=4, label=f"{result.name} (validation)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy loss (response tokens)")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    _save_figure(fig, Path(path))
    return Path(path)


def lora_update_norms(lora_path: PathLike) -> Tuple[List[str], List[str], torch.Tensor]:
    """Frobenius norm of each adapted weight's update, (alpha / r) ||B A||, read from an adapter file.

    Returns (projection names, layer names, norms of shape (n_projections, n_layers)); a projection a
    layer does not adapt is NaN. ||B A|| is computed without forming the (out, in) matrix:
    ||B A||_F^2 = trace(A^T B^T B A) = sum((B^T B) * (A A^T)), two r x r products."""
    lora_config, model_config, state = load_lora_checkpoint(lora_path)
    projections = [t for t in LLAMA_TARGETS if t in lora_config.targets and t != "head"]
    norms = torch.full((len(projections), model_config.n_layer), float("nan"))
    for row, target in enumerate(projections):
        for layer in range(model_config.n_layer):
            prefix = LLAMA_TARGETS[target].replace("*", str(layer))
            if f"{prefix}.lora_A" not in state:
                continue
            a, b = state[f"{prefix}.lora_A"].double(), state[f"{prefix}.lora_B"].double()  # (r, in), (out, r)
            squared = ((b.T @ b) * (a @ a.T)).sum().clamp_min(0.0)
            norms[row, layer] = lora_config.alpha / lora_config.r * squared.sqrt().item()
    return projections, [str(i) for i in range(model_config.n_layer)], norms


def plot_lora_heatmap(lora_path: PathLike, path: PathLike, title: str = "") -> Path:
    """Heatmap of (alpha / r) ||B A||_F per layer (columns) and projection (rows): where LoRA changed the model."""
    projections, layers, norms = lora_update_norms(lora_path)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(5.0, 0.45 * len(layers) + 2.5), 0.55 * len(projections) + 1.8))
    image = ax.imshow(norms.numpy(), cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(layers)), labels=layers)
    ax.set_yticks(range(len(projections)), labels=[f"{p}_proj" for p in projections])
    ax.set_xlabel("layer")
    if len(layers) <= 16:  # the values themselves, where they fit
        finite = norms[torch.isfinite(norms)]
        middle = float(finite.max() + finite.min()) / 2 if finite.numel() else 0.0
        for row, values in enumerate(norms.tolist()):
            for column, value in enumerate(values):
                if value == value:  # not NaN: this layer has this projection adapted
                    ax.text(column, row, f"{value:.2f}", ha="center", va="center", fontsize=8,
                            color="black" if value > middle else "white")
    fig.colorbar(image, ax=ax, label="(alpha / r) ||B A||_F")
    ax.set_title(title or "Size of the LoRA update per layer and projection")
    fig.tight_layout()
    _save_figure(fig, Path(path))
    return Path(path)
