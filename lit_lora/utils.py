"""Small helpers shared by the library and the scripts."""

import ctypes
import ctypes.util
import resource
import sys
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


def keep_freed_memory_for_reuse() -> bool:
    """Ask glibc's malloc to keep freed memory for the next allocation instead of giving it back to the
    kernel. Returns whether the setting took (False off Linux/glibc: nothing changes).

    Why it matters on CPU: glibc serves every allocation above ~32 MB with a fresh mmap and unmaps it on
    free, so a training step's largest tensors (the (B, T, V) logits and their gradient: 65 MB each in
    bf16 for 4 x 256 tokens of a 32k vocabulary) arrive as untouched pages, and the kernel faults in and
    zeroes 16k pages for each one, every step: a bf16 lm_head product took twice as long with a fresh
    output as with a reused one (about 6 % of the whole step). With these two settings the heap keeps
    such blocks and the next step reuses them. The peak can grow by fragmentation (measured with
    scripts/benchmark_finetune.py: ours did not grow; transformers + PEFT's bf16 step went from 1.45 to
    1.85 GB peak RSS). jemalloc or tcmalloc
    (LD_PRELOAD) achieve the same for any program. The setting lasts for the rest of the process, which
    then keeps its peak heap instead of returning it to the system. GPU memory is managed by PyTorch's
    own caching allocator and needs none of this.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl has no mallopt)
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    # Serve blocks up to 1 GB from the heap (glibcs that cap this setting at 32 MiB refuse it: then 32 MiB),
    # and never shrink the heap.
    mmap_set = mallopt(m_mmap_threshold, 1 << 30) or mallopt(m_mmap_threshold, 32 << 20)
    trim_set = mallopt(m_trim_threshold, (1 << 31) - 1)
    return bool(mmap_set and trim_set)
