"""The one training loop behind finetune/lora.py, finetune/adapter.py and finetune/full.py.

The scripts build the model, apply their method (LoRA, LLaMA-Adapter, or nothing for full finetuning),
mark what trains, and hand over to `fit`. Everything else lives here once:

    for each optimizer step:
        for each of `accumulation` micro-batches:        global batch = micro batch x accumulation x devices
            loss = cross_entropy(model(x)[:, :-1], labels[:, 1:])   (prompt tokens carry IGNORE_INDEX)
            backward(loss / accumulation)
        clip gradients; set lr (linear warmup, then cosine decay); optimizer step
        every eval_interval: validation loss/perplexity + one sample answer
        every save_interval: resumable checkpoint (trainable weights, optimizer, step, data position, RNG)

Lightning Fabric handles devices, precision and distributed strategies (DDP, FSDP): no home-made ones.
"""

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import lightning as L
import torch
import torch.nn.functional as F
from lightning.fabric.loggers import CSVLogger
from lightning.fabric.plugins import HalfPrecision
from lightning.fabric.strategies import FSDPStrategy
from tqdm import tqdm

from lit_lora.checkpoint import TOKENIZER_NAME, check_keys_and_shapes, load_checkpoint, save_json
from lit_lora.data import IGNORE_INDEX, BatchSampler, check_same_tokenizer, collate, load_prepare_config, load_prepared
from lit_lora.generate import generate
from lit_lora.model import Block, Llama
from lit_lora.prompts import PromptStyle, get_prompt_style
from lit_lora.quantize import load_checkpoint_quantized
from lit_lora.tokenizer import Tokenizer
from lit_lora.utils import count_parameters, keep_freed_memory_for_reuse, parameter_report, peak_memory

CHECKPOINT_DIR_NAME = "checkpoints"
FINISHED_NAME = "final_metrics.json"


@dataclass
class TrainArgs:
    """Optimisation hyperparameters (defaults: Lit-LLaMA's LoRA recipe; each script sets its own)."""

    learning_rate: float = 3e-4
    """Peak learning rate, reached after the warmup."""
    min_learning_rate: float = 0.0
    """Learning rate at the end of the cosine decay."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    betas: Sequence[float] = (0.9, 0.95)
    """AdamW betas."""
    global_batch_size: int = 128
    """Sequences per optimizer step, over all devices (reached by gradient accumulation)."""
    micro_batch_size: int = 4
    """Sequences per forward/backward pass on one device."""
    warmup_steps: int = 100
    """Optimizer steps of linear warmup from 0 to learning_rate."""
    max_steps: Optional[int] = None
    """Optimizer steps to run; by default `epochs` passes over the training data."""
    epochs: int = 1
    """Passes over the training data when max_steps is not given."""
    max_time: Optional[float] = None
    """Stop (with a resumable checkpoint) after this many seconds of training."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 disables)."""
    eval_interval: int = 100
    """Evaluate every N optimizer steps (and at the end)."""
    eval_iters: int = 50
    """Validation micro-batches per evaluation (a fixed subset: the same every time)."""
    save_interval: int = 1000
    """Write a resumable checkpoint every N optimizer steps (and at the end)."""
    log_interval: int = 1
    """Log metrics every N optimizer steps."""
    seed: int = 1337
    """Seeds weight init of the adapter, dropout and the data order."""
    group_by_length: bool = False
    """Batch sequences of similar length together to waste less compute on padding."""
    activation_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, ~1/3 more compute."""
    sample_instruction: str = "Recommend a movie for me to watch during the weekend and explain the reason."
    """Answered greedily at every evaluation, to watch the model learn."""

    def accumulation_steps(self, world_size: int) -> int:
        per_step = self.micro_batch_size * world_size
        if self.global_batch_size % per_step:
            raise ValueError(f"global_batch_size {self.global_batch_size} is not a multiple of micro_batch_size x devices = {per_step}")
        return self.global_batch_size // per_step


def lr_at(step: int, total_steps: int, args: TrainArgs) -> float:
    """Linear warmup to the peak, then cosine decay to min_learning_rate at total_steps."""
    if step < args.warmup_steps:
        return args.learning_rate * (step + 1) / args.warmup_steps
    progress = min(1.0, (step - args.warmup_steps) / max(1, total_steps - args.warmup_steps))
    return args.min_learning_rate + (args.learning_rate - args.min_learning_rate) * 0.5 * (1 + math.cos(math.pi * progress))


def default_precision(accelerator: str = "auto") -> str:
    """bf16-true on GPUs that support it; 32-true elsewhere (bf16 training on CPU is opt-in)."""
    if accelerator in ("auto", "cuda", "gpu") and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-true"
    return "32-true"


class HalfPrecisionKeepingOutputs(HalfPrecision):
    """Fabric's bf16-true / 16-true, except that the model's outputs are returned in the dtype they were
    computed in. Fabric casts every output back to float32, which here means a float32 copy of the whole
    (B, T, V) logits tensor and another of its gradient: ~10 % of a bf16 step on CPU. `loss_fn` upcasts
    the logits block by block itself."""

    PRECISIONS = ("bf16-true", "16-true")

    def convert_output(self, data: Any) -> Any:
        return data


def setup_fabric(out_dir: Path, precision: str, devices: int, num_nodes: int, strategy: str,
                 accelerator: str, activation_checkpointing: bool) -> L.Fabric:
    """Launch Fabric with CSV (and TensorBoard) logging. bf16-true/16-true keep the logits in 16 bits
    (`HalfPrecisionKeepingOutputs`); on CPU, malloc keeps freed memory for reuse from here on, for the
    whole process (`keep_freed_memory_for_reuse`)."""
    if strategy == "fsdp":
        strategy = FSDPStrategy(auto_wrap_policy={Block}, state_dict_type="full", sharding_strategy="FULL_SHARD",
                                activation_checkpointing_policy={Block} if activation_checkpointing else None)
    loggers: List[Any] = [CSVLogger(root_dir=out_dir, name="logs", flush_logs_every_n_steps=1)]
    try:
        from lightning.fabric.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(root_dir=out_dir, name="tensorboard"))
    except (ImportError, ModuleNotFoundError):
        pass
    plugins = None
    if precision in HalfPrecisionKeepingOutputs.PRECISIONS and not isinstance(strategy, FSDPStrategy):
        plugins, precision = [HalfPrecisionKeepingOutputs(precision)], None  # Fabric takes one or the other
    fabric = L.Fabric(accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy=strategy,
                      precision=precision, plugins=plugins, loggers=loggers)
    fabric.launch()
    if fabric.device.type == "cpu":
        keep_freed_memory_for_reuse()
    return fabric


PRECISION_DTYPES = {"bf16-true": torch.bfloat16, "16-true": torch.float16}


@dataclass
class Run:
    """Everything a finetuning script needs before it applies its method."""

    fabric: L.Fabric
    model: Llama
    train_data: List[Dict[str, torch.Tensor]]
    val_data: List[Dict[str, torch.Tensor]]
    tokenizer: Tokenizer
    prompt_style: PromptStyle


def start_run(checkpoint_dir: Path, data_dir: Path, out_dir: Path, train: TrainArgs, precision: Optional[str] = None,
              devices: int = 1, num_nodes: int = 1, strategy: str = "auto", accelerator: str = "auto",
              quantize: Optional[str] = None) -> Run:
    """Launch Fabric, load the base checkpoint in the training dtype (or in 4 bits with `quantize`,
    see lit_lora/quantize.py) and the prepared data, with checks."""
    if quantize is not None and strategy == "fsdp":
        raise ValueError("--quantize does not combine with --strategy fsdp: use ddp, or one device")
    precision = precision or default_precision(accelerator)
    fabric = setup_fabric(Path(out_dir), precision, devices, num_nodes, strategy, accelerator, train.activation_checkpointing)
    fabric.seed_everything(train.seed)  # the adapter's random init (LoRA's A) is the same on every rank
    dtype = PRECISION_DTYPES.get(precision, torch.float32)
    if quantize is None:
        model = load_checkpoint(checkpoint_dir, dtype=dtype)
    else:
        model = load_checkpoint_quantized(checkpoint_dir, mode=quantize, dtype=dtype, device=fabric.device)
    tokenizer = Tokenizer(Path(checkpoint_dir) / TOKENIZER_NAME)
    check_same_tokenizer(data_dir, tokenizer.model_path)
    prepared = load_prepare_config(data_dir)
    train_data = load_prepared(Path(data_dir) / prepared["files"]["train"])
    val_data = load_prepared(Path(data_dir) / prepared["files"]["val"])
    longest = max(len(sample["input_ids"]) for sample in train_data + val_data)
    if longest > model.config.block_size:
        raise ValueError(f"{data_dir} holds samples of {longest} tokens, longer than the model's context "
                         f"({model.config.block_size}): prepare it again with a smaller --max_seq_length")
    return Run(fabric, model, train_data, val_data, tokenizer, get_prompt_style(prepared["prompt_style"]))


def make_sampler(tokenizer: Tokenizer, style: PromptStyle, instruction: str,
                 max_new_tokens: int = 48) -> Callable[[Llama], str]:
    """A function answering `instruction` greedily with the current weights (for the evaluation log)."""
    prompt_ids = tokenizer.encode(style.format(instruction), bos=True)

    def sample(model: Llama) -> str:
        was_training = model.training
        model.eval()
        output = generate(model, prompt_ids.to(model.tok_embeddings.weight.device), max_new_tokens,
                          temperature=0.0, eos_id=tokenizer.eos_id)
        model.train(was_training)
        return tokenizer.decode(output[len(prompt_ids):])

    return sample




def rank_batches(sampler: BatchSampler, epoch: int, fabric: L.Fabric) -> List[List[int]]:
    """This process's micro-batches of `epoch`: every world_size-th batch of the one global order."""
    batches = sampler.batches(epoch)
    usable = len(batches) - len(batches) % fabric.world_size  # every rank gets as many batches
    return batches[fabric.global_rank : usable : fabric.world_size]


class ChunkedCrossEntropy(torch.autograd.Function):
    """Mean cross entropy over the rows of (N, V) logits, in float32, a block of rows at a time.

    Same value and gradient as `F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX)`,
    but without the float32 copy of all the logits that costs most with bf16 training: for a micro-batch
    of 4 x 256 tokens and Llama 2's 32k vocabulary, the logits are 65 MB in bf16, their float32 copy 131 MB,
    and log_softmax, its gradient and the cast back each pass over all of it again. Here each block of a
    few rows (on a CPU ~0.5 MB in float32: 4 rows of a 32k vocabulary) is upcast, reduced and dropped while
    still in the core's cache (4-row blocks measured 30 % faster than 32-row ones):

        forward   loss = mean over counted rows of  logsumexp(z) - z[target]
        backward  dloss/dz = (softmax(z) - onehot(target)) / n_counted     (0 on ignored rows)

    The naive version is the docstring's first line; `test_loss_fn_matches_cross_entropy` holds them equal.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, block_rows: int) -> torch.Tensor:
        counted = targets != IGNORE_INDEX  # (N,)
        safe_targets = targets.clamp(min=0)  # ignored rows gather any logit; they are masked out below
        target_logits = logits.gather(1, safe_targets[:, None]).squeeze(1).float()  # (N,)
        logsumexp = torch.cat([block.float().logsumexp(dim=-1) for block in logits.split(block_rows)])  # (N,)
        n_counted = counted.sum()
        ctx.save_for_backward(logits, safe_targets, logsumexp, counted, n_counted)
        ctx.block_rows = block_rows
        return ((logsumexp - target_logits) * counted).sum() / n_counted

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        logits, safe_targets, logsumexp, counted, n_counted = ctx.saved_tensors
        row_scale = counted * (grad_loss / n_counted.clamp(min=1))  # (N,): 0 for ignored rows, even if all are
        grad = torch.empty_like(logits)
        for start in range(0, logits.size(0), ctx.block_rows):
            rows = slice(start, start + ctx.block_rows)
            probs = (logits[rows].float() - logsumexp[rows, None]).exp_()  # softmax, (block_rows, V)
            probs.scatter_add_(1, safe_targets[rows, None], -torch.ones_like(probs[:, :1]))  # minus onehot
            torch.mul(probs, row_scale[rows, None], out=grad[rows])  # back to the logits' dtype
        return grad, None, None


def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross entropy: position t predicts token t+1; IGNORE_INDEX labels (prompt, padding) don't count.

    logits (B, T, V) in any dtype, labels (B, T) -> the mean over counted positions, a float32 scalar.
    """
    # Shift the labels, not the logits: slicing (B, T, V) logits would copy them, forward and backward.
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # (B, T); the last position predicts nothing
    # A CPU block of ~0.5 MB of float32 stays in the core's L2 cache; on a GPU, ~64 MB blocks keep the
    # number of kernel launches low and are still a small part of a float32 copy of the logits.
    block_bytes = 1 << 19 if logits.device.type == "cpu" else 1 << 26
    block_rows = max(1, block_bytes // (4 * logits.size(-1)))
    return ChunkedCrossEntropy.apply(logits.flatten(0, 1), targets.flatten(), block_rows)


@torch.no_grad()
def validate(fabric: L.Fabric, model: torch.nn.Module, val_data: List[Dict[str, torch.Tensor]], args: TrainArgs) -> float:
    model.eval()
    sampler = BatchSampler([len(s["input_ids"]) for s in val_data], args.micro_batch_size, shuffle=False, seed=0)
    batches = rank_batches(sampler, 0, fabric)[: args.eval_iters]
    losses = []
    for indices in batches:
        batch = fabric.to_device(collate([val_data[i] for i in indices]))
        losses.append(loss_fn(model(batch["input_ids"]), batch["labels"]))
    model.train()
    mean = torch.stack(losses).mean() if losses else torch.tensor(float("nan"), device=fabric.device)
    return fabric.all_reduce(mean, reduce_op="mean").item()


def _find_resume_checkpoint(out_dir: Path, resume: Optional[str]) -> Optional[Path]:
    if resume is None:
        return None
    if resume != "auto":
        path = Path(resume)
        if not path.exists():
            raise FileNotFoundError(f"--resume {path}: no such checkpoint")
        return path
    candidates = sorted((out_dir / CHECKPOINT_DIR_NAME).glob("step-*.ckpt"))
    return candidates[-1] if candidates else None


def fit(fabric: L.Fabric, model: torch.nn.Module, train_data: List[Dict[str, torch.Tensor]],
        val_data: List[Dict[str, torch.Tensor]], args: TrainArgs, out_dir: Path, *,
        save_weights: Callable[[Path, torch.nn.Module], None], weights_name: str,
        sample: Optional[Callable[[torch.nn.Module], str]] = None, resume: Optional[str] = None,
        overwrite: bool = False, hyperparameters: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Train the parameters of `model` that require grad; returns the final metrics.

    `save_weights(path, model)` writes what this method keeps (adapter weights only, or the full model)
    to `out_dir / weights_name` at the end. `sample(model)` answers a fixed instruction at each evaluation.
    """
    out_dir = Path(out_dir)
    if (out_dir / FINISHED_NAME).exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already holds a finished run ({FINISHED_NAME}); pass --overwrite true or choose another --out_dir")
    if overwrite and resume is None and fabric.global_rank == 0 and (out_dir / CHECKPOINT_DIR_NAME).exists():
        shutil.rmtree(out_dir / CHECKPOINT_DIR_NAME)
    if not train_data:
        raise ValueError("the training split is empty: prepare more data or lower --val_size")
    if fabric.global_rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        if hyperparameters is not None:  # the resolved arguments; reusable with --config hyperparameters.json
            as_json = json.dumps(hyperparameters, default=lambda v: asdict(v) if is_dataclass(v) else str(v))
            save_json(json.loads(as_json), out_dir / "hyperparameters.json")

    accumulation = args.accumulation_steps(fabric.world_size)
    sampler = BatchSampler([len(s["input_ids"]) for s in train_data], args.micro_batch_size, shuffle=True,
                           seed=args.seed, group_by_length=args.group_by_length)
    steps_per_epoch = max(1, len(rank_batches(sampler, 0, fabric)) // accumulation)
    total_steps = args.max_steps or args.epochs * steps_per_epoch

    model.activation_checkpointing = args.activation_checkpointing and not isinstance(fabric.strategy, FSDPStrategy)
    trainable_shapes = {name: p.shape for name, p in model.named_parameters() if p.requires_grad}
    fabric.print(f"{parameter_report(model)}; {peak_memory(fabric.device)} after loading")
    model = fabric.setup_module(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.learning_rate, weight_decay=args.weight_decay, betas=tuple(args.betas))
    optimizer = fabric.setup_optimizers(optimizer)

    fabric.seed_everything(args.seed)  # dropout draws the same masks on every rank and after a resume
    progress = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "rng": torch.get_rng_state(), "history": []}
    state = {"model": model, "optimizer": optimizer, "progress": progress}
    checkpoint = _find_resume_checkpoint(out_dir, resume)
    if checkpoint is not None:
        if checkpoint.is_file():
            saved = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
            check_keys_and_shapes(trainable_shapes, saved.get("model", {}), str(checkpoint))
        fabric.load(checkpoint, state, strict=False, weights_only=True)
        progress = state["progress"]
        torch.set_rng_state(progress["rng"])
        fabric.print(f"resumed from {checkpoint} at step {progress['step']}")

    def save_resumable() -> Path:
        path = out_dir / CHECKPOINT_DIR_NAME / f"step-{progress['step']:06d}.ckpt"
        tmp = path.with_name(path.name + ".tmp")
        fabric.save(tmp, state, filter={"model": lambda name, _: name in trainable_shapes})
        fabric.barrier()
        if fabric.global_rank == 0:
            os.replace(tmp, path)
            for old in (out_dir / CHECKPOINT_DIR_NAME).glob("step-*.ckpt"):
                if old != path:  # keep only the newest: a full-model checkpoint can be tens of GB
                    old.unlink()
        return path

    def validate_and_log(with_sample: bool = True) -> Dict[str, float]:
        val_loss = validate(fabric, model, val_data, args)
        metrics = {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}
        fabric.log_dict(metrics, step=progress["step"])
        progress["history"].append({"step": progress["step"], **metrics})
        message = f"step {progress['step']}: val loss {val_loss:.4f}, perplexity {metrics['val_ppl']:.2f}"
        if with_sample and sample is not None and fabric.global_rank == 0 and not isinstance(fabric.strategy, FSDPStrategy):
            message += f"\n  sample: {sample(model.module)!r}"
        fabric.print(message)
        return metrics

    if checkpoint is None:
        validate_and_log(with_sample=False)  # the loss before training: the baseline to beat
    model.train()
    start_time, tokens_seen, step_times = time.perf_counter(), 0, []
    metrics: Dict[str, float] = {}
    bar = tqdm(total=total_steps, initial=progress["step"], desc="training", disable=fabric.global_rank != 0, dynamic_ncols=True)
    try:
        while progress["step"] < total_steps:
            batches = rank_batches(sampler, progress["epoch"], fabric)
            if progress["batch_in_epoch"] + accumulation > len(batches):  # a partial window ends the epoch
                progress["epoch"], progress["batch_in_epoch"] = progress["epoch"] + 1, 0
                continue
            step_start = time.perf_counter()
            window = batches[progress["batch_in_epoch"] : progress["batch_in_epoch"] + accumulation]
            step_loss = torch.zeros((), device=fabric.device)
            for i, indices in enumerate(window):
                batch = fabric.to_device(collate([train_data[j] for j in indices]))
                with fabric.no_backward_sync(model, enabled=i < accumulation - 1):
                    loss = loss_fn(model(batch["input_ids"]), batch["labels"])
                    fabric.backward(loss / accumulation)
                step_loss += loss.detach() / accumulation
                tokens_seen += batch["input_ids"].numel() * fabric.world_size
            step_loss = fabric.all_reduce(step_loss, reduce_op="mean").item()
            if not math.isfinite(step_loss):
                kept = sorted((out_dir / CHECKPOINT_DIR_NAME).glob("step-*.ckpt"))
                raise FloatingPointError(f"loss became {step_loss} at step {progress['step'] + 1}; training stopped. "
                                         f"Last good checkpoint: {kept[-1] if kept else 'none'}. Lower the learning rate or check the data.")
            if args.grad_clip:
                fabric.clip_gradients(model, optimizer, max_norm=args.grad_clip)
            lr = lr_at(progress["step"], total_steps, args)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

            progress["step"] += 1
            progress["batch_in_epoch"] += accumulation
            progress["rng"] = torch.get_rng_state()
            progress["history"].append({"step": progress["step"], "train_loss": step_loss})
            step_times.append(time.perf_counter() - step_start)
            elapsed = time.perf_counter() - start_time
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_seen / elapsed:.0f}")
            if progress["step"] % args.log_interval == 0:
                fabric.log_dict({"train_loss": step_loss, "lr": lr, "tokens_per_sec": tokens_seen / elapsed}, step=progress["step"])
            if progress["step"] % args.eval_interval == 0 and progress["step"] < total_steps:
                validate_and_log()
            if progress["step"] % args.save_interval == 0 and progress["step"] < total_steps:
                save_resumable()
            if args.max_time is not None and elapsed > args.max_time:
                fabric.print(f"max_time of {args.max_time:.0f} s reached at step {progress['step']}")
                break
    except KeyboardInterrupt:
        bar.close()
        fabric.print(f"interrupted: saved a resumable checkpoint at {save_resumable()} (continue with --resume auto)")
        raise SystemExit(130)
    bar.close()

    metrics = validate_and_log()
    last_checkpoint = save_resumable()
    finished = progress["step"] >= total_steps
    trainable_count, total_count = count_parameters(model)
    metrics.update({
        "steps": progress["step"], "total_steps": total_steps, "finished": finished,
        "final_train_loss": next((h["train_loss"] for h in reversed(progress["history"]) if "train_loss" in h), None),
        "seconds_per_step": sum(step_times) / max(1, len(step_times)),
        "trainable_parameters": trainable_count, "total_parameters": total_count,
        "peak_memory": peak_memory(fabric.device),
    })
    if fabric.global_rank == 0:
        if finished:
            save_weights(out_dir / weights_name, model.module)
            metrics["weights_path"] = str(out_dir / weights_name)
        plot_losses(progress["history"], out_dir / "loss.png")
        save_json({"history": progress["history"]}, out_dir / "history.json")
        if finished:
            save_json(metrics, out_dir / FINISHED_NAME)
    fabric.print(f"{parameter_report(model)}; {metrics['peak_memory']}; resumable checkpoint {last_checkpoint}")
    if finished:
        fabric.print(f"saved {out_dir / weights_name}")
    return metrics


def plot_losses(history: List[Dict[str, float]], path: Path) -> None:
    """Training and validation loss against the optimizer step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["train_loss"]) for h in history if "train_loss" in h]
    val = [(h["step"], h["val_loss"]) for h in history if "val_loss" in h]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
