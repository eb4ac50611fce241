"""The one training loop behind finetune/lora.py, finetune/adapter.py and finetune/full.py.

The scripts build the model, apply their method (LoRA, LLaMA-Adapter, or nothing for full finetuning;
lit_lora/methods.py), mark what trains, and hand over to `fit`, which runs this loop:

    for each optimizer step:
        for each of `accumulation` micro-batches:        global batch = micro batch x accumulation x devices
            loss = cross_entropy(model(x)[:, :-1], labels[:, 1:])   (prompt tokens carry IGNORE_INDEX)
            backward(loss / accumulation)
        clip gradients; set lr (linear warmup, then cosine decay); optimizer step
        every eval_interval: validation loss/perplexity + one sample answer
        every save_interval: resumable checkpoint (trainable weights, optimizer, step, data position, RNG)

Lightning Fabric handles devices, precision and the distributed strategies (DDP, FSDP). Pieces of
lit_lora/speed/training.py make it faster without changing what it computes: the cross entropy is taken a few
rows at a time (`chunked_cross_entropy`), a subclass of Fabric's own half-precision plugin keeps
the logits in bf16 instead of copying them to float32, and `--compile` compiles the forward and backward
passes (`compile_for_training`). With `--train.packing` the micro-batches are packed rows
(`PackedBatchSampler`, lit_lora/data.py): several samples per row, each computed as if alone.
"""

import functools
import math
import os
import pickle
import signal
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import lightning as L
import torch
import torch.nn.functional as F
from lightning.fabric.loggers import CSVLogger
from lightning.fabric.strategies import FSDPStrategy
from tqdm import tqdm

from lit_lora.data import (IGNORE_INDEX, BatchSampler, PackedBatchSampler, check_same_tokenizer, collate, load_prepare_config,
                           load_prepared_split)
# The loop saves, resumes and plots through lit_lora.files, and takes the faster loss, attention and quantized
# loading from lit_lora.speed (each call below names the plain formula it stands for).
from lit_lora.files.checkpoint import CheckpointError, check_finite, check_keys_and_shapes, load_checkpoint, save_json
from lit_lora.files.plots import plot_losses
from lit_lora.files.run_dir import (CHECKPOINT_DIR_NAME, FINISHED_NAME, claim_out_dir, deferred_signals, find_resume_checkpoints,
                                    remove_path, set_aside)
from lit_lora.files.utils import PathLike, count_parameters, parameter_report, peak_memory
from lit_lora.generate import generate
from lit_lora.model import Block, Llama
from lit_lora.prompts import PromptStyle, get_prompt_style
from lit_lora.speed.quantize import load_checkpoint_quantized
from lit_lora.speed.training import (HalfPrecisionKeepingOutputs, TrainingForms, chunked_cross_entropy, compile_for_training,
                                     compiled_cross_entropy, keep_freed_memory_for_reuse)
from lit_lora.tokenizer import Tokenizer


@dataclass
class TrainArgs:
    """Optimisation hyperparameters. The defaults are finetune/lora.py's recipe; each method's recipe in
    lit_lora/methods.py sets its own learning rate, weight decay and batch sizes."""

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
    packing: bool = False
    """Pack several samples into each row (as long as the longest sample), each attending only to itself:
    far less padding, the same loss per sample. micro_batch_size and global_batch_size then count rows."""
    activation_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, ~1/3 more compute."""
    sample_instruction: str = "Recommend a movie for me to watch during the weekend and explain the reason."
    """Answered greedily at every evaluation, to watch the model learn."""

    def __post_init__(self) -> None:
        at_least = {"global_batch_size": 1, "micro_batch_size": 1, "warmup_steps": 0, "epochs": 1, "eval_interval": 1,
                    "eval_iters": 1, "save_interval": 1, "log_interval": 1}
        for name, lowest in at_least.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
                raise ValueError(f"train.{name} must be an integer >= {lowest}, got {value!r}")
        if self.max_steps is not None and (not isinstance(self.max_steps, int) or self.max_steps < 1):
            raise ValueError(f"train.max_steps must be a positive integer (or null: `epochs` passes), got {self.max_steps!r}")
        for name in ("learning_rate", "min_learning_rate", "weight_decay", "grad_clip"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"train.{name} must be a finite number >= 0, got {value!r}")
        if self.max_time is not None and not self.max_time > 0:
            raise ValueError(f"train.max_time must be positive (seconds) or null, got {self.max_time!r}")

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


def setup_fabric(out_dir: Path, precision: str, devices: int = 1, num_nodes: int = 1, strategy: str = "auto",
                 accelerator: str = "auto", activation_checkpointing: bool = False) -> L.Fabric:
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
class RunSettings:
    """Where a finetuning run reads and writes, and how it runs: what every finetune script passes on."""

    checkpoint_dir: Path
    data_dir: Path
    out_dir: Path
    train: TrainArgs
    precision: Optional[str] = None  # default: bf16-true on GPUs that support it, else 32-true
    devices: int = 1
    num_nodes: int = 1
    strategy: str = "auto"
    accelerator: str = "auto"
    quantize: Optional[str] = None  # QLoRA: the frozen base in 4 bits (lit_lora/speed/quantize.py)
    compile: bool = False  # torch.compile the forward and backward passes (speed.training.compile_for_training)
    resume: Optional[str] = None  # "auto" or the path of a resumable checkpoint
    overwrite: bool = False


@dataclass
class Run:
    """Everything a finetuning run needs before its method is applied."""

    fabric: L.Fabric
    model: Llama
    train_data: List[Dict[str, torch.Tensor]]
    val_data: List[Dict[str, torch.Tensor]]
    tokenizer: Tokenizer
    prompt_style: PromptStyle
    max_seq_length: int  # the longest sample the data was prepared for


def start_run(settings: RunSettings) -> Run:
    """Launch Fabric, load the base checkpoint in the training dtype (or in 4 bits with `quantize`,
    see lit_lora/speed/quantize.py) and the prepared data, with checks."""
    if settings.quantize is not None and settings.strategy == "fsdp":
        raise ValueError("--quantize does not combine with --strategy fsdp: use ddp, or one device")
    precision = settings.precision or default_precision(settings.accelerator)
    fabric = setup_fabric(Path(settings.out_dir), precision, settings.devices, settings.num_nodes, settings.strategy,
                          settings.accelerator, settings.train.activation_checkpointing)
    fabric.seed_everything(settings.train.seed)  # the adapter's random init (LoRA's A) is the same on every rank
    dtype = PRECISION_DTYPES.get(precision, torch.float32)
    if settings.quantize is None:
        model = load_checkpoint(settings.checkpoint_dir, dtype=dtype)
    else:
        model = load_checkpoint_quantized(settings.checkpoint_dir, mode=settings.quantize, dtype=dtype,
                                          device=fabric.device)
    data_dir = Path(settings.data_dir)
    tokenizer = Tokenizer(settings.checkpoint_dir)
    check_same_tokenizer(data_dir, tokenizer.model_path)
    prepared = load_prepare_config(data_dir)
    train_data = load_prepared_split(data_dir, "train", model.config.vocab_size)
    val_data = load_prepared_split(data_dir, "val", model.config.vocab_size)
    longest = max(len(sample["input_ids"]) for sample in train_data + val_data)
    if longest > model.config.block_size:
        raise ValueError(f"{data_dir} holds samples of {longest} tokens, longer than the model's context "
                         f"({model.config.block_size}): prepare it again with a smaller --max_seq_length")
    return Run(fabric, model, train_data, val_data, tokenizer, get_prompt_style(prepared["prompt_style"]),
               prepared.get("max_seq_length") or longest)


def answer_sampler(tokenizer: Tokenizer, prompt: str, max_new_tokens: int = 48) -> Callable[[Llama], str]:
    """A function answering `prompt` greedily with the model's current weights, for the evaluation log."""
    prompt_ids = tokenizer.encode(prompt, bos=True)

    def sample(model: Llama) -> str:
        was_training = model.training
        model.eval()
        output = generate(model, prompt_ids.to(model.tok_embeddings.weight.device), max_new_tokens,
                          temperature=0.0, eos_id=tokenizer.stop_ids)
        model.train(was_training)
        return tokenizer.decode(output[len(prompt_ids):])

    return sample


def parameter_groups(model: torch.nn.Module, lr_scale: Callable[[str], float]) -> List[Dict[str, Any]]:
    """The trainable parameters as optimizer groups, one per learning-rate factor ("lr_scale")."""
    groups: Dict[float, List[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups.setdefault(lr_scale(name), []).append(param)
    return [{"params": params, "lr_scale": scale} for scale, params in groups.items()]


Sampler = Union[BatchSampler, PackedBatchSampler]


def make_sampler(train_data: List[Dict[str, torch.Tensor]], args: TrainArgs) -> Sampler:
    """Padded batches (optionally grouped by length), or packed rows as long as the longest sample."""
    lengths = [len(s["input_ids"]) for s in train_data]
    if args.packing:
        return PackedBatchSampler(lengths, args.micro_batch_size, row_length=max(lengths), seed=args.seed)
    return BatchSampler(lengths, args.micro_batch_size, shuffle=True, seed=args.seed, group_by_length=args.group_by_length)


@functools.lru_cache(maxsize=4)  # fit asks at every step; packing an epoch's rows takes ~0.2 s for Alpaca's 52k
def rank_batches(sampler: Sampler, epoch: int, fabric: L.Fabric) -> List[Any]:
    """This process's micro-batches of `epoch`: every world_size-th batch of the one global order (not to be
    modified: the list is cached)."""
    batches = sampler.batches(epoch)
    usable = len(batches) - len(batches) % fabric.world_size  # every rank gets as many batches
    return batches[fabric.global_rank : usable : fabric.world_size]


def check_one_step_fits(batches_per_epoch: int, accumulation: int, samples: int, args: TrainArgs, world_size: int) -> None:
    """A one-line error unless an epoch holds the micro-batches of one optimizer step: the loop ends an
    epoch at its last whole step, so a step larger than the data would never come.

    Why refuse instead of shrinking the accumulation to fit: the global batch size sets the scale of each
    update (and, with the learning rate, the recipe); a run that quietly trained with another one would
    not be the run asked for, nor comparable to one on more data."""
    if batches_per_epoch >= accumulation:
        return
    unit = "packed rows" if args.packing else "samples"
    per_batch = args.micro_batch_size * world_size
    fits = batches_per_epoch * per_batch
    fix = (f"lower --train.global_batch_size to {fits} or less" if fits else
           f"lower --train.micro_batch_size (and --train.global_batch_size) to {samples // world_size} or less")
    raise ValueError(f"one optimizer step needs {args.global_batch_size} {unit} (global_batch_size; {accumulation} "
                     f"micro-batches of {args.micro_batch_size}{f' on {world_size} devices' if world_size > 1 else ''}), "
                     f"but the {samples} training samples make only {batches_per_epoch} micro-batches per epoch: "
                     f"{fix}, or prepare more data")


def plan_steps(fabric: L.Fabric, sampler: Sampler, samples: int, val_samples: int, accumulation: int,
               args: TrainArgs) -> int:
    """The optimizer steps of the run (max_steps, or `epochs` passes), after checking that one step fits an
    epoch and printing a note for each setting a small dataset or a short run quietly changes."""
    batches_per_epoch = len(rank_batches(sampler, 0, fabric))
    check_one_step_fits(batches_per_epoch, accumulation, samples, args, fabric.world_size)
    total_steps = args.max_steps or args.epochs * max(1, batches_per_epoch // accumulation)
    for note in small_data_notes(val_samples, total_steps, args):
        fabric.print(f"note: {note}")
    return total_steps


def small_data_notes(val_samples: int, total_steps: int, args: TrainArgs) -> List[str]:
    """What a small dataset or a short run quietly changes, said once at the start."""
    notes = []
    if not val_samples:
        notes.append("the prepared data has no validation samples: no validation loss or perplexity will be "
                     "reported (prepare it with --val_size N to hold some records out)")
    if args.warmup_steps > total_steps:
        peak = lr_at(total_steps - 1, total_steps, args)
        notes.append(f"--train.warmup_steps {args.warmup_steps} is more than this run's {total_steps} steps: the "
                     f"learning rate only reaches {peak:.3g} of {args.learning_rate:g} (lower --train.warmup_steps)")
    return notes


def loss_fn(logits: torch.Tensor, labels: torch.Tensor, compiled: bool = False) -> torch.Tensor:
    """Next-token cross entropy: position t predicts token t+1; IGNORE_INDEX labels (prompt, padding) don't count.

    logits (B, T, V) in any dtype, labels (B, T) -> the mean over counted positions, a float32 scalar:

        F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)

    computed by `chunked_cross_entropy` (lit_lora/speed/training.py), which never copies the logits to float32,
    or with `compiled` (training with --compile) by `compiled_cross_entropy`, the same in two compiled loops.
    """
    # Shift the labels, not the logits: slicing (B, T, V) logits would copy them, forward and backward.
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # (B, T); the last position predicts nothing
    cross_entropy = compiled_cross_entropy if compiled else chunked_cross_entropy
    return cross_entropy(logits.flatten(0, 1), targets.flatten())  # (B*T, V), (B*T,)


@torch.no_grad()
def validate(fabric: L.Fabric, model: torch.nn.Module, val_data: List[Dict[str, torch.Tensor]],
             args: TrainArgs) -> Optional[float]:
    """The loss over the first `eval_iters` validation micro-batches, token-weighted: the mean over every
    counted position of them, so exp(it) is the perplexity of those tokens. None without validation data."""
    sampler = BatchSampler([len(s["input_ids"]) for s in val_data], args.micro_batch_size, shuffle=False, seed=0)
    batches = rank_batches(sampler, 0, fabric)[: args.eval_iters]
    if not batches:
        return None
    model.eval()
    total = torch.zeros(2, device=fabric.device)  # (sum of losses, counted positions)
    for indices in batches:
        batch = fabric.to_device(collate([val_data[i] for i in indices]))
        counted = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
        loss = loss_fn(model(batch["input_ids"]), batch["labels"])  # NaN when nothing is counted: weight 0
        total += torch.stack([torch.where(counted > 0, loss * counted, 0.0), counted.float()])
    model.train()
    total = fabric.all_reduce(total, reduce_op="sum")
    return (total[0] / total[1]).item() if total[1] > 0 else None  # nothing counted: nothing to report


# ----------------------------------------------------------------------------------------------------
# The loop, and the named pieces it is made of
# ----------------------------------------------------------------------------------------------------


@dataclass
class Loop:
    """What the pieces of `fit` share: the set-up run and its resumable state."""

    fabric: L.Fabric
    model: Any  # the model as Fabric wrapped it
    optimizer: Any
    sampler: Sampler
    args: TrainArgs
    out_dir: Path
    trainable_shapes: Dict[str, torch.Size]
    progress: Dict[str, Any]  # step, epoch, batch_in_epoch, rng, history, batch: saved in every resumable checkpoint
    compiled: bool = False  # the model was compiled (--compile): the loss is compiled too

    def state(self) -> Dict[str, Any]:
        return {"model": self.model, "optimizer": self.optimizer, "progress": self.progress}

    def checkpoints(self) -> List[Path]:
        """The resumable checkpoints in out_dir, newest first."""
        return sorted((self.out_dir / CHECKPOINT_DIR_NAME).glob("step-*.ckpt"), reverse=True)

    def loss_before(self, checkpoint: Path) -> Optional[float]:
        """The mean training loss of the few steps up to a checkpoint's step (None if unknown)."""
        step = checkpoint_step(checkpoint)
        losses = [h["train_loss"] for h in self.progress["history"]
                  if "train_loss" in h and step - LOSS_WINDOW < h["step"] <= step and math.isfinite(h["train_loss"])]
        return sum(losses) / len(losses) if losses else None

    def good_checkpoint(self) -> Optional[Path]:
        """The checkpoint saved before the training loss started to climb: the newest one, unless an older
        one kept had a clearly lower loss (a run that diverges slowly saves weights that are already drifting)."""
        kept = self.checkpoints()
        scored = [(loss, checkpoint) for checkpoint in kept if (loss := self.loss_before(checkpoint)) is not None]
        if not scored:
            return kept[0] if kept else None
        lowest, best = min(scored, key=lambda pair: pair[0])
        newest_loss = self.loss_before(kept[0])
        return best if newest_loss is not None and newest_loss > CLIMB * lowest else kept[0]

    def diverged(self, what: str, step: int) -> FloatingPointError:
        kept, good = self.checkpoints(), self.good_checkpoint()
        where = f"{good if good else 'none'}"
        if good is not None and kept and good != kept[0]:
            where += (f" (step {checkpoint_step(good)}, training loss {self.loss_before(good):.4g}; the loss climbed to "
                      f"{self.loss_before(kept[0]):.4g} by {kept[0].name}: resume from {good.name}, not the newer ones)")
        return FloatingPointError(f"{what} at step {step}; training stopped. Last good checkpoint: {where}. "
                                  "Lower the learning rate or check the data.")


LOSS_WINDOW = 5  # training steps averaged to score a checkpoint
CLIMB = 1.25  # an older checkpoint is the good one when the newest one's loss is this much higher


def checkpoint_step(checkpoint: Path) -> int:
    """The step of `checkpoints/step-NNNNNN.ckpt`."""
    return int(checkpoint.name.split("-")[1].split(".")[0])


def compiled_if_asked(fabric: L.Fabric, model: Llama, compile_model: bool) -> torch.nn.Module:
    """The model compiled for training when asked and possible (Fabric compiles its own wrapper again)."""
    if not compile_model:
        return model
    strategy = "fsdp" if isinstance(fabric.strategy, FSDPStrategy) else "other"
    compiled, note = compile_for_training(model, fabric.device, model.tok_embeddings.weight.dtype, strategy)
    fabric.print(note or "--compile: the first step compiles the model (its time is reported as first_step_seconds)")
    return compiled


def resume_from(loop: Loop, candidates: List[Path]) -> Path:
    """Load trainable weights, optimizer state, data position and RNG state from the first readable
    checkpoint of `candidates` (its weights' names and shapes checked against the model's trainable
    parameters); an unreadable one is named, and the next is tried. Returns the one loaded."""
    for index, checkpoint in enumerate(candidates):
        try:
            if checkpoint.is_file():
                saved = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
                try:
                    check_keys_and_shapes(loop.trainable_shapes, saved.get("model", {}), str(checkpoint))
                except CheckpointError as error:  # readable, but written by another method or other settings
                    raise CheckpointError(f"{error} (a checkpoint of another method or other settings: resume it with "
                                          "the finetune script and settings that wrote it)") from None
                check_finite(saved.get("model", {}), str(checkpoint))
            state = loop.state()
            loop.fabric.load(checkpoint, state, strict=False, weights_only=True)
        except CheckpointError:  # it says what the checkpoint is: not a truncated or corrupt file
            raise
        except (RuntimeError, OSError, EOFError, KeyError, ValueError, pickle.UnpicklingError) as error:
            problem = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            message = f"{checkpoint} is not a readable checkpoint (truncated or corrupt?): {problem}"
            if index + 1 == len(candidates):
                raise CheckpointError(message) from None
            if loop.fabric.global_rank == 0:
                set_aside(checkpoint)
            loop.fabric.print(f"{message}; set it aside as {checkpoint.name}.corrupt and falling back to "
                              f"{candidates[index + 1]}")
            continue
        loop.progress = state["progress"]
        torch.set_rng_state(loop.progress["rng"])
        loop.fabric.print(f"resumed from {checkpoint} at step {loop.progress['step']}")
        saved_batch, batch = loop.progress.get("batch"), batch_settings(loop)
        if saved_batch is not None and {"packing": False, **saved_batch} != batch:  # older checkpoints: no packing
            loop.fabric.print(f"note: this run's batch settings {batch} differ from the checkpoint's {saved_batch}: its "
                              f"data position (micro-batch {loop.progress['batch_in_epoch']} of epoch "
                              f"{loop.progress['epoch']}) counts other batches, so part of the epoch is repeated or "
                              "skipped, and the data order and the learning-rate schedule continue from a different run")
        loop.progress["batch"] = batch
        return checkpoint
    raise FileNotFoundError("--resume: no checkpoint to resume from")


def batch_settings(loop: Loop) -> Dict[str, int]:
    return {"global_batch_size": loop.args.global_batch_size, "micro_batch_size": loop.args.micro_batch_size,
            "devices": loop.fabric.world_size, "packing": loop.args.packing}


def save_resumable(loop: Loop) -> Path:
    """Write `checkpoints/step-NNNNNN.ckpt` (to a temporary name, then renamed), and delete all but this
    one, the one before it and, while the training loss climbs, the last one from before it did (a
    full-model checkpoint can be tens of GB). Weights that are not all
    finite are never saved: every checkpoint is one that training can resume from."""
    finite = torch.tensor(float(all(bool(torch.isfinite(p).all()) for p in loop.model.parameters() if p.requires_grad)))
    if not loop.fabric.all_reduce(finite.to(loop.fabric.device), reduce_op="min"):  # each FSDP rank sees its shard
        raise loop.diverged("the trainable weights became NaN or infinite", loop.progress["step"])
    directory = loop.out_dir / CHECKPOINT_DIR_NAME
    path = directory / f"step-{loop.progress['step']:06d}.ckpt"
    tmp = path.with_name(path.name + ".tmp")
    try:
        loop.fabric.save(tmp, loop.state(), filter={"model": lambda name, _: name in loop.trainable_shapes})
        loop.fabric.barrier()
        if loop.fabric.global_rank == 0:
            os.replace(tmp, path)
    except BaseException as error:
        if loop.fabric.global_rank == 0 and tmp.exists():
            remove_path(tmp)
        if isinstance(error, RuntimeError):  # torch.save's message for a full disk or a failed write
            raise OSError(f"could not write {path}: {error} (is the disk full?)") from None
        raise
    if loop.fabric.global_rank == 0:
        good = loop.good_checkpoint()  # kept too: the one to go back to if the loss is climbing
        for old in loop.checkpoints()[2:]:
            if old != good:
                remove_path(old)
    return path


def train_step(loop: Loop, train_data: List[Dict[str, torch.Tensor]], window: List[Any], lr: float) -> Tuple[float, int]:
    """One optimizer step over the micro-batches of `window`; returns the mean loss (all ranks) and the
    number of tokens this rank's model ran (padding included). A NaN or infinite loss or gradient stops
    training before the weights are touched."""
    fabric, model, optimizer = loop.fabric, loop.model, loop.optimizer
    step_loss, tokens = torch.zeros((), device=fabric.device), 0
    for i, indices in enumerate(window):
        batch = fabric.to_device(loop.sampler.collate(train_data, indices))
        with fabric.no_backward_sync(model, enabled=i < len(window) - 1):  # DDP syncs gradients once, at the end
            with TrainingForms():  # the attention of short bf16 rows on a CPU as plain matrix products
                logits = model(batch["input_ids"], segment_ids=batch.get("segment_ids"))
            loss = loss_fn(logits, batch["labels"], compiled=loop.compiled)
            fabric.backward(loss / len(window))
        step_loss += loss.detach() / len(window)
        tokens += batch["input_ids"].numel()
    step_loss = fabric.all_reduce(step_loss, reduce_op="mean").item()
    step = loop.progress["step"] + 1
    if not math.isfinite(step_loss):
        raise loop.diverged(f"the loss became {step_loss}", step)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if loop.args.grad_clip:
        norm = fabric.clip_gradients(model, optimizer, max_norm=loop.args.grad_clip, error_if_nonfinite=False)
    else:
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])) if grads else torch.zeros(())
    # fp16 training (16-mixed) scales the loss; an overflow there is routine: the scaler skips the step itself
    loss_scaled = getattr(fabric.strategy.precision, "scaler", None) is not None
    if not loss_scaled and not bool(fabric.all_reduce(torch.isfinite(norm).float(), reduce_op="min")):
        raise loop.diverged("the gradients became NaN or infinite", step)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return step_loss, tokens


def evaluate(loop: Loop, val_data: List[Dict[str, torch.Tensor]], sample: Optional[Callable[[Llama], str]]) -> Dict[str, float]:
    """Validation loss and perplexity, logged and added to the history; plus one sample answer. Empty
    without validation data; a NaN or infinite validation loss stops training."""
    val_loss = validate(loop.fabric, loop.model, val_data, loop.args)
    if val_loss is None:
        return {}
    if not math.isfinite(val_loss):
        raise loop.diverged(f"the validation loss became {val_loss}", loop.progress["step"])
    metrics = {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}
    loop.fabric.log_dict(metrics, step=loop.progress["step"])
    loop.progress["history"].append({"step": loop.progress["step"], **metrics})
    message = f"step {loop.progress['step']}: val loss {val_loss:.4f}, perplexity {metrics['val_ppl']:.2f}"
    if sample is not None and loop.fabric.global_rank == 0 and not isinstance(loop.fabric.strategy, FSDPStrategy):
        message += f"\n  sample: {sample(loop.model.module)!r}"
    loop.fabric.print(message)
    return metrics


def stop_requested(loop: Loop, received: List[int]) -> bool:
    """Whether any rank received a signal (all ranks stop at the same step)."""
    if loop.fabric.world_size == 1:
        return bool(received)
    return bool(loop.fabric.all_reduce(torch.tensor(float(bool(received)), device=loop.fabric.device), reduce_op="max"))


def finish(loop: Loop, metrics: Dict[str, Any], total_steps: int, step_times: List[float],
           save_weights: Callable[[Path, torch.nn.Module], None], weights_name: str) -> Dict[str, Any]:
    """A last resumable checkpoint, the loss plot and history; if every step ran, the method's weights and
    final_metrics.json (which marks the run finished). Returns the final metrics."""
    last_checkpoint = save_resumable(loop)
    finished = loop.progress["step"] >= total_steps
    later_steps = step_times[1:] or step_times
    trainable_count, total_count = count_parameters(loop.model)
    history = loop.progress["history"]
    metrics = {**metrics,
        "steps": loop.progress["step"], "total_steps": total_steps, "finished": finished,
        "final_train_loss": next((h["train_loss"] for h in reversed(history) if "train_loss" in h), None),
        # the first step includes one-off work (compiling with --compile, allocator warm-up): reported apart
        "first_step_seconds": step_times[0] if step_times else None,
        "seconds_per_step": sum(later_steps) / max(1, len(later_steps)),
        # one step is a noisy sample: the median and the range of all of them rank methods reliably
        "step_seconds": ({"median": statistics.median(later_steps), "min": min(later_steps), "max": max(later_steps),
                          "steps": len(later_steps)} if later_steps else None),
        "trainable_parameters": trainable_count, "total_parameters": total_count,
        "peak_memory": peak_memory(loop.fabric.device),
    }
    weights_path = loop.out_dir / weights_name
    if loop.fabric.global_rank == 0:
        if finished:
            save_weights(weights_path, loop.model.module)
            metrics["weights_path"] = str(weights_path)
        plot_losses(history, loop.out_dir / "loss.png")
        save_json({"history": history}, loop.out_dir / "history.json")
        if finished:
            save_json(metrics, loop.out_dir / FINISHED_NAME)
    loop.fabric.print(f"{parameter_report(loop.model)}; {metrics['peak_memory']}; resumable checkpoint {last_checkpoint}")
    if finished:
        loop.fabric.print(f"saved {weights_path}")
    return metrics


def fit(fabric: L.Fabric, model: Llama, train_data: List[Dict[str, torch.Tensor]],
        val_data: List[Dict[str, torch.Tensor]], args: TrainArgs, out_dir: PathLike, *,
        save_weights: Callable[[Path, torch.nn.Module], None], weights_name: str,
        sample: Optional[Callable[[Llama], str]] = None, resume: Optional[str] = None,
        overwrite: bool = False, hyperparameters: Optional[Dict[str, Any]] = None,
        lr_scale: Callable[[str], float] = lambda name: 1.0, compile_model: bool = False) -> Dict[str, Any]:
    """Train the parameters of `model` that require grad; returns the final metrics.

    `save_weights(path, model)` writes what this method keeps (adapter weights only, or the full model)
    to `out_dir / weights_name` at the end. `sample(model)` answers a fixed instruction at each evaluation.
    `lr_scale(parameter name)` multiplies the learning rate of that parameter (LoRA+; 1 for all by default).
    `compile_model` runs the forward and backward passes compiled (`speed.training.compile_for_training`).
    """
    out_dir = Path(out_dir)
    if not train_data:
        raise ValueError("the training split is empty: prepare more data or lower --val_size")
    accumulation = args.accumulation_steps(fabric.world_size)
    sampler = make_sampler(train_data, args)
    total_steps = plan_steps(fabric, sampler, len(train_data), len(val_data), accumulation, args)

    with claim_out_dir(fabric, out_dir, resume, overwrite, weights_name, hyperparameters):
        model.activation_checkpointing = args.activation_checkpointing and not isinstance(fabric.strategy, FSDPStrategy)
        trainable_shapes = {name: p.shape for name, p in model.named_parameters() if p.requires_grad}
        fabric.print(f"{parameter_report(model)}; {peak_memory(fabric.device)} after loading")
        runner = compiled_if_asked(fabric, model, compile_model)
        wrapped = fabric.setup_module(runner)
        optimizer = torch.optim.AdamW(parameter_groups(wrapped, lr_scale), lr=args.learning_rate,
                                      weight_decay=args.weight_decay, betas=tuple(args.betas))
        fabric.seed_everything(args.seed)  # dropout draws the same masks on every rank and after a resume
        progress = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "rng": torch.get_rng_state(), "history": []}
        loop = Loop(fabric, wrapped, fabric.setup_optimizers(optimizer), sampler, args, out_dir, trainable_shapes, progress,
                    compiled=runner is not model)
        loop.progress["batch"] = batch_settings(loop)
        candidates = find_resume_checkpoints(out_dir, resume)
        if candidates:
            resume_from(loop, candidates)
        else:
            evaluate(loop, val_data, sample=None)  # the loss before training: the baseline to beat

        loop.model.train()
        start_time, tokens_seen, step_times = time.perf_counter(), 0, []
        bar = tqdm(total=total_steps, initial=loop.progress["step"], desc="training", disable=fabric.global_rank != 0,
                   dynamic_ncols=True)
        with deferred_signals() as received:
            while loop.progress["step"] < total_steps:
                progress = loop.progress
                batches = rank_batches(sampler, progress["epoch"], fabric)
                if progress["batch_in_epoch"] + accumulation > len(batches):  # a partial window ends the epoch
                    check_one_step_fits(len(batches), accumulation, len(train_data), args, fabric.world_size)  # no endless skip
                    progress["epoch"], progress["batch_in_epoch"] = progress["epoch"] + 1, 0
                    continue
                step_start = time.perf_counter()
                window = batches[progress["batch_in_epoch"] : progress["batch_in_epoch"] + accumulation]
                lr = lr_at(progress["step"], total_steps, args)
                loss, tokens = train_step(loop, train_data, window, lr)
                tokens_seen += tokens * fabric.world_size  # padded, as the model sees them
                progress.update(step=progress["step"] + 1, batch_in_epoch=progress["batch_in_epoch"] + accumulation,
                                rng=torch.get_rng_state())
                progress["history"].append({"step": progress["step"], "train_loss": loss})
                step_times.append(time.perf_counter() - step_start)
                elapsed = time.perf_counter() - start_time
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_seen / elapsed:.0f}")
                if progress["step"] % args.log_interval == 0:
                    fabric.log_dict({"train_loss": loss, "lr": lr, "tokens_per_sec": tokens_seen / elapsed}, step=progress["step"])
                if stop_requested(loop, received):
                    bar.close()
                    signal_name = signal.Signals(received[0]).name if received else "a signal on another rank"
                    fabric.print(f"{signal_name}: saved a resumable checkpoint at {save_resumable(loop)} "
                                 "(continue with --resume auto)")
                    raise SystemExit(128 + (received[0] if received else signal.SIGTERM))
                if progress["step"] % args.eval_interval == 0 and progress["step"] < total_steps:
                    evaluate(loop, val_data, sample)
                if progress["step"] % args.save_interval == 0 and progress["step"] < total_steps:
                    save_resumable(loop)
                if args.max_time is not None and elapsed > args.max_time:
                    fabric.print(f"max_time of {args.max_time:.0f} s reached at step {progress['step']}")
                    break
            bar.close()
            return finish(loop, evaluate(loop, val_data, sample), total_steps, step_times, save_weights, weights_name)
