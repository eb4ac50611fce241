"""The speed room, training half: each piece computes what a plain line of PyTorch computes, only faster
or in less memory; lit_lora/train.py calls them and names the plain formula beside each call.

    piece                          replaces                                        why it is faster
    chunked_cross_entropy          F.cross_entropy(logits.float(), targets)        no float32 copy of the logits
    HalfPrecisionKeepingOutputs    Fabric's bf16-true/16-true precision plugin     no float32 copy of the outputs
    keep_freed_memory_for_reuse    glibc's default malloc thresholds (CPU)         no fresh zeroed pages per step

The decoding half is lit_lora/speed.py. benchmarks/benchmark_finetune.py prints the same-run ratios.
"""

import ctypes
import ctypes.util
import sys
from typing import Any

import torch
from lightning.fabric.plugins import HalfPrecision

from lit_lora.data import IGNORE_INDEX

# ----------------------------------------------------------------------------------------------------
# The loss without a float32 copy of the logits
# ----------------------------------------------------------------------------------------------------


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


def chunked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """`F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX)` for (N, V) logits in any dtype
    and (N,) targets, computed by `ChunkedCrossEntropy`. A CPU block of ~0.5 MB of float32 stays in the
    core's L2 cache; on a GPU, ~64 MB blocks keep the number of kernel launches low and are still a small
    part of a float32 copy of the logits."""
    block_bytes = 1 << 19 if logits.device.type == "cpu" else 1 << 26
    block_rows = max(1, block_bytes // (4 * logits.size(-1)))
    return ChunkedCrossEntropy.apply(logits, targets, block_rows)


class HalfPrecisionKeepingOutputs(HalfPrecision):
    """Fabric's own bf16-true / 16-true plugin, except that the model's outputs are returned in the dtype
    they were computed in. Fabric casts every output back to float32, which here means a float32 copy of
    the whole (B, T, V) logits tensor and another of its gradient: ~10 % of a bf16 step on CPU.
    `chunked_cross_entropy` upcasts the logits block by block itself."""

    PRECISIONS = ("bf16-true", "16-true")

    def convert_output(self, data: Any) -> Any:
        return data


def keep_freed_memory_for_reuse() -> bool:
    """Ask glibc's malloc to keep freed memory for the next allocation instead of giving it back to the
    kernel. Returns whether the setting took (False off Linux/glibc: nothing changes).

    Why it matters on CPU: glibc serves every allocation above ~32 MB with a fresh mmap and unmaps it on
    free, so a training step's largest tensors (the (B, T, V) logits and their gradient: 65 MB each in
    bf16 for 4 x 256 tokens of a 32k vocabulary) arrive as untouched pages, and the kernel faults in and
    zeroes 16k pages for each one, every step. With these two settings the heap keeps such blocks and the
    next step reuses them. The peak can grow by fragmentation. jemalloc or tcmalloc (LD_PRELOAD) achieve
    the same for any program. The setting is process-wide and lasts for the rest of the process, which
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
