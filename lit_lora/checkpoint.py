"""Checkpoints that describe themselves, loaded cheaply and checked strictly.

A lit-lora model checkpoint is a directory:

    checkpoint_dir/
        lit_model.safetensors   the weights (safetensors: no pickle, memory-mapped when read)
        model_config.json       every `Config` field: the model is rebuilt from this, nothing retyped
        tokenizer.model         the SentencePiece model, when the source had one

An adapter checkpoint (LoRA or LLaMA-Adapter) is one small `.safetensors` file holding only the adapter
weights; its header metadata names the method, the method's settings (rank, alpha, targets, ...) and
the base model's `Config`, so the adapter can be rebuilt and checked against the base it is loaded on.

Every file is written to a temporary name and renamed into place, so an interrupted run never leaves
a half-written file behind.
"""

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, Mapping, Optional, Tuple, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from lit_lora.model import Config, Llama

WEIGHTS_NAME = "lit_model.safetensors"
CONFIG_NAME = "model_config.json"
TOKENIZER_NAME = "tokenizer.model"
PathLike = Union[str, Path]
_UMASK = os.umask(0o022)
os.umask(_UMASK)  # reading the umask means setting it: put it straight back


class CheckpointError(ValueError):
    """A checkpoint file that is missing, unreadable, or does not fit the model it is loaded into."""


@contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it to `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give them the usual permissions
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_json(data: Any, path: PathLike) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")


def load_json(path: PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} not found")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path} is not valid JSON ({error})") from None


def save_tensors(tensors: Mapping[str, torch.Tensor], path: PathLike, metadata: Optional[Dict[str, str]] = None) -> None:
    """Write tensors as safetensors, atomically."""
    with atomic_path(path) as tmp:
        save_file({name: t.detach().contiguous() for name, t in tensors.items()}, str(tmp), metadata=metadata)


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


def save_checkpoint(checkpoint_dir: PathLike, state: Mapping[str, torch.Tensor], config: Config,
                    tokenizer_path: Optional[PathLike] = None) -> Path:
    """Write a lit-lora checkpoint directory (weights, config and optionally the tokenizer)."""
    checkpoint_dir = Path(checkpoint_dir)
    state = dict(state)
    if config.tie_embeddings:
        state.pop("lm_head.weight", None)
    save_tensors(state, checkpoint_dir / WEIGHTS_NAME, metadata={"format": "pt"})
    save_json(config.to_dict(), checkpoint_dir / CONFIG_NAME)
    if tokenizer_path is not None and Path(tokenizer_path).resolve() != (checkpoint_dir / TOKENIZER_NAME).resolve():
        with atomic_path(checkpoint_dir / TOKENIZER_NAME) as tmp:
            tmp.write_bytes(Path(tokenizer_path).read_bytes())
    return checkpoint_dir


def load_config(checkpoint_dir: PathLike) -> Config:
    path = Path(checkpoint_dir) / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{path} not found: is {checkpoint_dir} a lit-lora checkpoint? "
                              "Convert one with scripts/convert_hf_checkpoint.py")
    try:
        return Config.from_dict(load_json(path))
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: invalid model config ({error})") from None


def load_checkpoint(checkpoint_dir: PathLike, dtype: Optional[torch.dtype] = None,
                    device: Optional[Union[str, torch.device]] = None) -> Llama:
    """Rebuild the model from `model_config.json` and load `lit_model.safetensors` into it.

    The model is built on the meta device (no memory, no random init) and the loaded tensors are
    assigned in place of the meta ones, so loading costs one copy of the weights, not two.
    """
    checkpoint_dir = Path(checkpoint_dir)
    config = load_config(checkpoint_dir)
    with torch.device("meta"):
        model = Llama(config)
    weights_path = checkpoint_dir / WEIGHTS_NAME
    state, _ = load_tensors(weights_path)
    check_keys_and_shapes(model_state_shapes(model), state, str(weights_path))
    if dtype is not None:
        state = {name: t.to(dtype) if t.is_floating_point() else t for name, t in state.items()}
    model.load_state_dict(state, strict=not config.tie_embeddings, assign=True)
    if config.tie_embeddings:  # assign=True replaced the shared Parameter: tie the head again
        model.lm_head.weight = model.tok_embeddings.weight
    return model.to(device) if device is not None else model


def save_adapter_file(path: PathLike, tensors: Mapping[str, torch.Tensor], method: str, settings: Dict[str, Any],
                 model_config: Config) -> Path:
    """Write adapter-only weights with the method, its settings and the base model config in the header."""
    metadata = {"method": method, "settings": json.dumps(settings), "model_config": json.dumps(model_config.to_dict())}
    save_tensors(tensors, path, metadata=metadata)
    return Path(path)


def load_adapter_file(path: PathLike, method: Optional[str] = None) -> Tuple[Dict[str, Any], Config, Dict[str, torch.Tensor]]:
    """Read an adapter file written by `save_adapter_file`: (settings, base model config, tensors)."""
    tensors, metadata = load_tensors(path)
    if "method" not in metadata or "settings" not in metadata or "model_config" not in metadata:
        raise CheckpointError(f"{path} is not a lit-lora adapter file (its header names no method/settings/model_config)")
    if method is not None and metadata["method"] != method:
        raise CheckpointError(f"{path} holds a {metadata['method']!r} adapter, not {method!r}")
    try:
        settings = json.loads(metadata["settings"])
        model_config = Config.from_dict(json.loads(metadata["model_config"]))
    except (json.JSONDecodeError, TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: unreadable adapter header ({error})") from None
    return settings, model_config, tensors
