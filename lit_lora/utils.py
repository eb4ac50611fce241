"""Small helpers shared by the library and the scripts."""

import resource
from typing import Tuple

import torch
import torch.nn as nn


def count_parameters(model: nn.Module) -> Tuple[int, int]:
    """(trainable, total) parameter counts; a tied weight is counted once. Works on the meta device."""
    params = list(model.parameters())  # nn.Module.parameters() already yields a shared Parameter once
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def parameter_report(model: nn.Module) -> str:
    trainable, total = count_parameters(model)
    return f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.4f} %)"


def peak_memory(device: torch.device) -> str:
    """Peak memory of this process: allocated GPU memory on CUDA, resident set size on the CPU."""
    if device.type == "cuda":
        return f"peak GPU memory {torch.cuda.max_memory_allocated(device) / 1e9:.2f} GB"
    return f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB"  # ru_maxrss is in kB on Linux
