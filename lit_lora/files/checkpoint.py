"""Checkpoints that describe themselves, loaded cheaply and checked strictly.

A lit-lora model checkpoint is a directory:

    checkpoint_dir/
        lit_model.safetensors   the weights (safetensors: no pickle, memory-mapped when read)
        model_config.json       every `Config` field: the model is rebuilt from this, nothing retyped
        tokenizer.model         the SentencePiece model, when the source had one, or
        tokenizer.json, ...     the Hugging Face tokenizer files (TOKENIZER_FILES), when it had those
        training.json           for a fully finetuned model: the prompt style it learned, its max sequence length

A method's weights file (a LoRA or LLaMA-Adapter adapter) is one small `.safetensors` file holding
only what the method trained; its header metadata names the method, the method's settings (rank, alpha,
targets, ...), the base model's `Config`, and how it was trained (prompt style, maximum sequence
length), so the adapter can be rebuilt, checked against the base it is loaded on, and prompted the way
it learned. lit_lora/methods.py reads and writes these files for every method.

Every file is written to a temporary name and renamed into place, so an interrupted run never leaves
a half-written file behind.
"""

import glob
import json
import math
import os
import secrets
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from lit_lora.files.utils import PathLike
from lit_lora.model import Config, Llama


WEIGHTS_NAME = "lit_model.safetensors"
CONFIG_NAME = "model_config.json"
TOKENIZER_NAME = "tokenizer.model"
HF_TOKENIZER_NAME = "tokenizer.json"
# Everything that describes a tokenizer: SentencePiece's one file, or Hugging Face's tokenizer.json and the
# side files that name its special tokens, the chat template and the ids that end a generation.
TOKENIZER_FILES = (TOKENIZER_NAME, HF_TOKENIZER_NAME, "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "chat_template.jinja")
TRAINING_NAME = "training.json"  # a finetuned checkpoint's prompt style and maximum sequence length


class CheckpointError(ValueError):
    """A checkpoint file that is missing, unreadable, or does not fit the model it is loaded into."""


@contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it to `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):  # left by a writer that was killed
        stale.unlink(missing_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")  # unique: concurrent writers never share it
    # O_EXCL: never reuse an existing file; mode 0o666 lets the umask give the usual permissions.
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _json_safe(value: Any) -> Any:
    """NaN and infinities as null: JSON has no such numbers, and Python's `NaN` would make the file invalid."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    return value


def save_json(data: Any, path: PathLike) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(_json_safe(data), indent=2, allow_nan=False) + "\n")


def load_json(path: PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} not found")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path} is not valid JSON ({error})") from None


def save_tensors(tensors: Mapping[str, torch.Tensor], path: PathLike, metadata: Optional[Dict[str, str]] = None) -> None:
    """Write tensors as safetensors, atomically; a failed write (e.g. a full disk) is an OSError naming the file."""
    with atomic_path(path) as tmp:
        try:
            save_file({name: t.detach().contiguous() for name, t in tensors.items()}, str(tmp), metadata=metadata)
        except (SafetensorError, RuntimeError) as error:
            raise OSError(f"could not write {path}: {error} (is the disk full?)") from None


def check_finite(tensors: Mapping[str, torch.Tensor], source: str) -> None:
    """A `CheckpointError` naming `source` and the tensors if any floating-point value is NaN or infinite:
    such weights are the remains of a diverged run, never worth saving or loading."""
    bad = [name for name, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise CheckpointError(f"{source} holds NaN or infinite values in {_short(bad)}: the training run that made "
                              "them diverged; use an earlier checkpoint or train again with a lower learning rate")


def load_tensors(path: PathLike, device: str = "cpu") -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """Read every tensor and the header metadata of a safetensors file, with a one-line error if it is
    missing, truncated or corrupt."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} not found")
    try:
        with safe_open(str(path), framework="pt", device=device) as f:
            return {name: f.get_tensor(name) for name in f.keys()}, (f.metadata() or {})
    except (SafetensorError, OSError, RuntimeError) as error:
        raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupt?): {error}") from None


def _short(names: list) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def check_keys_and_shapes(expected: Mapping[str, torch.Size], actual: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise a `CheckpointError` naming `source` unless `actual` has exactly the expected keys and shapes."""
    missing = sorted(set(expected) - set(actual))
    unexpected = sorted(set(actual) - set(expected))
    wrong = [f"{name} {tuple(actual[name].shape)} != expected {tuple(expected[name])}"
             for name in sorted(set(expected) & set(actual)) if tuple(actual[name].shape) != tuple(expected[name])]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} keys: {_short(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} keys: {_short(unexpected)}")
    if wrong:
        problems.append(f"wrong shapes: {_short(wrong)}")
    if problems:
        raise CheckpointError(f"{source} does not match the model: " + "; ".join(problems))


def model_state_shapes(model: torch.nn.Module) -> Dict[str, torch.Size]:
    """Names and shapes of the tensors a checkpoint of `model` stores (a tied head is stored once)."""
    shapes = {name: t.shape for name, t in model.state_dict().items()}
    if getattr(getattr(model, "config", None), "tie_embeddings", False):
        shapes.pop("lm_head.weight", None)
    return shapes


def tokenizer_file(directory: PathLike) -> Optional[Path]:
    """The tokenizer a directory holds: its tokenizer.model, else its tokenizer.json, else None."""
    for name in (TOKENIZER_NAME, HF_TOKENIZER_NAME):
        if (Path(directory) / name).is_file():
            return Path(directory) / name
    return None


def copy_tokenizer_files(tokenizer_path: PathLike, destination_dir: PathLike) -> None:
    """Copy a tokenizer file (as tokenizer.model or tokenizer.json) and, for a Hugging Face one, the other
    TOKENIZER_FILES beside it into `destination_dir`, each atomically."""
    tokenizer_path = Path(tokenizer_path)
    huggingface = tokenizer_path.suffix == ".json"
    copies = {tokenizer_path: HF_TOKENIZER_NAME if huggingface else TOKENIZER_NAME}
    if huggingface:
        copies.update({tokenizer_path.parent / name: name for name in TOKENIZER_FILES[2:]})
    for source, name in copies.items():
        destination = Path(destination_dir) / name
        if source.is_file() and source.resolve() != destination.resolve():
            with atomic_path(destination) as tmp:
                shutil.copyfile(source, tmp)


def save_checkpoint(checkpoint_dir: PathLike, state: Mapping[str, torch.Tensor], config: Config,
                    tokenizer_path: Optional[PathLike] = None, training: Optional[Dict[str, Any]] = None) -> Path:
    """Write a lit-lora checkpoint directory (weights, config and optionally the tokenizer, and for a
    finetuned model how it was trained: `training.json` with its prompt style and maximum sequence length)."""
    checkpoint_dir = Path(checkpoint_dir)
    state = dict(state)
    if config.tie_embeddings:
        state.pop("lm_head.weight", None)
    check_finite(state, f"the model to save as {checkpoint_dir}")
    save_tensors(state, checkpoint_dir / WEIGHTS_NAME, metadata={"format": "pt"})
    save_json(config.to_dict(), checkpoint_dir / CONFIG_NAME)
    if training is not None:
        save_json(training, checkpoint_dir / TRAINING_NAME)
    if tokenizer_path is not None:
        copy_tokenizer_files(tokenizer_path, checkpoint_dir)
    return checkpoint_dir


def recorded_prompt_style(checkpoint_dir: PathLike) -> Optional[str]:
    """The prompt style a merged or fully finetuned checkpoint records in its training.json (None for a
    base model)."""
    path = Path(checkpoint_dir) / TRAINING_NAME
    if not path.is_file():
        return None
    training = load_json(path)
    style = training.get("prompt_style") if isinstance(training, dict) else None
    return style if isinstance(style, str) else None


def load_config(checkpoint_dir: PathLike) -> Config:
    path = Path(checkpoint_dir) / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{path} not found: is {checkpoint_dir} a lit-lora checkpoint? "
                              "Convert one with scripts/convert_hf_checkpoint.py")
    try:
        return Config.from_dict(load_json(path))
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: invalid model config ({error})") from None


def _read_error(path: Path, error: Exception) -> CheckpointError:
    return CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupt?): {error}")


def read_shapes(path: PathLike) -> Dict[str, torch.Tensor]:
    """The tensors of a safetensors file as meta tensors of the same shapes, from its header alone (no
    tensor data is read), e.g. for `check_keys_and_shapes`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {name: torch.empty(f.get_slice(name).get_shape(), device="meta") for name in f.keys()}
    except (SafetensorError, OSError, RuntimeError) as error:
        raise _read_error(path, error) from None


def read_tensor(path: PathLike, name: str) -> torch.Tensor:
    """One tensor of a safetensors file. The file is opened for this one tensor: while a safetensors file
    stays open its memory map keeps every page read so far resident, and a loader that quantizes tensor
    by tensor would grow by the whole checkpoint."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor(name)
    except (SafetensorError, OSError, RuntimeError) as error:
        raise _read_error(Path(path), error) from None


@torch.no_grad()
def load_checkpoint(checkpoint_dir: PathLike, dtype: Optional[torch.dtype] = None,
                    device: Optional[Union[str, torch.device]] = None,
                    prepare: Optional[Callable[[Llama], Any]] = None) -> Llama:
    """Rebuild the model from `model_config.json` and load `lit_model.safetensors` into it.

    The model is built on the meta device (no memory, no random init) and the file's keys and shapes are
    checked from its header before any weight is read. Then the tensors are read one at a time and each
    becomes its parameter (assigned, not copied into a preallocated one), so loading holds one copy of
    the weights, in `dtype` (default: as stored) on `device` (default: CPU).

    `prepare(model)` may change the meta model before the weights arrive, e.g. swap its Linear layers for
    empty quantized layers (lit_lora/speed/quantize.py): the changed model is then allocated on `device` up
    front, and a module with a `load_weight` method receives its tensor through it.
    """
    checkpoint_dir = Path(checkpoint_dir)
    config = load_config(checkpoint_dir)
    with torch.device("meta"):
        model = Llama(config)
    if dtype is not None:
        model.to(dtype)  # free on the meta device; quantized layers take it as their compute dtype
    expected = model_state_shapes(model)
    path = checkpoint_dir / WEIGHTS_NAME
    check_keys_and_shapes(expected, read_shapes(path), str(path))
    device = torch.device(device or "cpu")
    if prepare is not None:
        prepare(model)
        # Allocate the whole (now smaller) model before reading: buffers allocated one by one between the
        # quantization temporaries fragment the heap (an nf4-dq peak 15-25 % higher on a 310 MB checkpoint).
        model.to_empty(device=device)
    for name in expected:
        tensor = read_tensor(path, name)
        if not tensor.is_floating_point():
            raise CheckpointError(f"{path}: {name} has dtype {tensor.dtype}, expected a floating-point tensor")
        module_name, _, tensor_name = name.rpartition(".")
        owner = model.get_submodule(module_name)
        if hasattr(owner, "load_weight"):
            owner.load_weight(tensor)  # quantizes it, refusing NaN or infinite values
        else:
            check_finite({name: tensor}, str(path))
            if prepare is not None:
                owner.get_parameter(tensor_name).copy_(tensor)
            else:
                setattr(owner, tensor_name, nn.Parameter(tensor.to(device, dtype or tensor.dtype)))
        del tensor
    if config.tie_embeddings:  # the file stores the shared matrix once, as the embedding
        if hasattr(model.lm_head, "load_weight"):  # a quantized head keeps a quantized copy
            model.lm_head.load_weight(model.tok_embeddings.weight)
        else:
            model.lm_head.weight = model.tok_embeddings.weight
    left_empty = [name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left_empty:  # e.g. a `prepare` that added modules the file has no weights for
        raise CheckpointError(f"{path} left {_short(left_empty)} without a value (on the meta device)")
    return model


def refuse_to_overwrite(path: PathLike, overwrite: bool) -> None:
    """A one-line FileExistsError when `path` exists and the user did not say --overwrite: no command
    replaces an earlier result without being told to."""
    if Path(path).exists() and not overwrite:
        raise FileExistsError(f"{path} already exists: pass --overwrite true to replace it, or choose another output")


@contextmanager
def removed_on_failure(output_dir: PathLike) -> Iterator[Path]:
    """Create `output_dir`; if the block fails, remove every directory this call created. (Files inside
    are written atomically, so an output directory that existed before keeps its old, complete files.)"""
    output_dir = Path(output_dir)
    first_created = None
    if not output_dir.exists():
        first_created = output_dir
        while not first_created.parent.exists():
            first_created = first_created.parent
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        yield output_dir
    except BaseException:
        if first_created is not None:
            shutil.rmtree(first_created, ignore_errors=True)
        raise


# ----------------------------------------------------------------------------------------------------
# Method weights files: what LoRA, LLaMA-Adapter and the other methods of lit_lora/methods.py save
# ----------------------------------------------------------------------------------------------------


@dataclass
class MethodFile:
    """The contents of a method's weights file."""

    method: str  # "lora", "adapter", ...
    settings: Dict[str, Any]  # the method's config as a dict (LoRAConfig.to_dict(), ...)
    model_config: Config  # the base model it was trained on
    tensors: Dict[str, torch.Tensor]
    training: Dict[str, Any] = field(default_factory=dict)  # prompt_style, max_seq_length (absent in older files)


def save_method_file(path: PathLike, contents: MethodFile) -> Path:
    """Write the tensors with the method, its settings, the base model config and the training facts in
    the header."""
    check_finite(contents.tensors, f"the {contents.method} weights to save as {path}")
    metadata = {"method": contents.method, "settings": json.dumps(contents.settings),
                "model_config": json.dumps(contents.model_config.to_dict()), "training": json.dumps(contents.training)}
    save_tensors(contents.tensors, path, metadata=metadata)
    return Path(path)


def read_method_file(path: PathLike, method: Optional[str] = None) -> MethodFile:
    """Read a file written by `save_method_file`; `method`, when given, must be the one it holds."""
    tensors, metadata = load_tensors(path)
    if "method" not in metadata or "settings" not in metadata or "model_config" not in metadata:
        raise CheckpointError(f"{path} is not a lit-lora adapter file (its header names no method/settings/model_config)")
    if method is not None and metadata["method"] != method:
        raise CheckpointError(f"{path} holds a {metadata['method']!r} adapter, not {method!r}")
    try:
        settings = json.loads(metadata["settings"])
        model_config = Config.from_dict(json.loads(metadata["model_config"]))
        training = json.loads(metadata.get("training", "{}"))
    except (json.JSONDecodeError, TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: unreadable adapter header ({error})") from None
    if not isinstance(settings, dict) or not isinstance(training, dict):
        raise CheckpointError(f"{path}: unreadable adapter header (settings and training must be JSON objects)")
    check_finite(tensors, str(path))
    return MethodFile(metadata["method"], settings, model_config, tensors, training)


def check_same_base(source: str, trained_on: Config, model_config: Config) -> None:
    """A `CheckpointError` listing the differing fields unless an adapter trained on `trained_on` fits a
    model of `model_config` (the name aside)."""
    theirs, ours = trained_on.to_dict(), model_config.to_dict()
    differences = [f"{key}={theirs[key]!r} (model has {ours[key]!r})" for key in theirs
                   if key != "name" and theirs[key] != ours[key]]
    if differences:
        raise CheckpointError(f"{source} was trained on a different base model: {', '.join(differences)}; "
                              "load the base checkpoint it was finetuned from")
