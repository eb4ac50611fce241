"""Small helpers shared by the library and the scripts: path and dtype names, file digests, parameter counts, memory."""

import hashlib
import resource
from pathlib import Path, PurePath
from typing import Dict, Optional, Tuple, Union

import torch
import torch.nn as nn


PathLike = Union[str, Path]
DTYPES: Dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: Optional[str]) -> Optional[torch.dtype]:
    """'bfloat16' -> torch.bfloat16; None stays None (keep the dtype a tensor already has)."""
    if name is None:
        return None
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def inside(directory: PathLike, name: str, source: str) -> Path:
    """`directory / name` when `name` is a plain relative name (no absolute path, no ".." part); a ValueError
    naming `source` (the file that named it) otherwise: a name such as "../x" or "/etc/x" taken from an
    input file must not reach out of its directory. Symbolic links inside the directory (a Hugging Face
    cache's snapshots, a DVC or git-annex checkout) are followed as usual."""
    relative = PurePath(name)
    if relative.is_absolute() or ".." in relative.parts or not relative.parts:
        raise ValueError(f"{source} names {name!r}, which lies outside {directory}: refused")
    return Path(directory) / relative


def file_sha256(path: PathLike) -> str:
    """The sha256 hex digest of a file, read 1 MiB at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def count_parameters(model: nn.Module) -> Tuple[int, int]:
    """(trainable, total) parameter counts; a tied weight is counted once. Works on the meta device."""
    params = list(model.parameters())  # nn.Module.parameters() already yields a shared Parameter once
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def parameter_report(model: nn.Module) -> str:
    trainable, total = count_parameters(model)
    return f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.4f} %)"


def tied_parameters(model: nn.Module) -> set:
    """ids of the parameters that more than one module holds (e.g. an lm_head tied to the token embedding):
    such a weight cannot be wrapped or quantized without changing, or storing twice, its other user."""
    seen: Dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        seen[id(param)] = seen.get(id(param), 0) + 1
    return {param_id for param_id, count in seen.items() if count > 1}


def peak_memory(device: torch.device) -> str:
    """Peak memory of this process: allocated GPU memory on CUDA, resident set size on the CPU."""
    if device.type == "cuda":
        return f"peak GPU memory {torch.cuda.max_memory_allocated(device) / 1e9:.2f} GB"
    return f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB"  # ru_maxrss is in kB on Linux
