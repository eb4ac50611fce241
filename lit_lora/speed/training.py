"""The speed room, training half: each piece computes what a plain line of PyTorch computes, only faster
or in less memory; lit_lora/train.py calls them and names the plain formula beside each call.

    piece                          replaces                                        why it is faster
    chunked_cross_entropy          F.cross_entropy(logits.float(), targets)        no float32 copy of the logits
    compiled_cross_entropy         the same, with --compile                        one fused pass forward, one back
    TrainingForms                  F.scaled_dot_product_attention, short bf16 rows two large matrix products
    HalfPrecisionKeepingOutputs    Fabric's bf16-true/16-true precision plugin     no float32 copy of the outputs
    keep_freed_memory_for_reuse    glibc's default malloc thresholds (CPU)         no fresh zeroed pages per step
    compile_for_training           the eager forward and backward                  fused elementwise work, tuned GEMMs

The decoding half is lit_lora/speed/decoding.py. benchmarks/benchmark_finetune.py prints the same-run ratios.
"""

import ctypes
import ctypes.util
import functools
import os
import shutil
import sys
from typing import Any, Callable, Optional, Tuple

import torch
from lightning.fabric.plugins import HalfPrecision
from torch.overrides import TorchFunctionMode

from lit_lora.data import IGNORE_INDEX
from lit_lora.model import naive_attention


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


def logsumexp_rows(logits: torch.Tensor) -> torch.Tensor:
    """(N, V) logits in any dtype -> (N,) float32 logsumexp, each row upcast as it is read."""
    return logits.float().logsumexp(dim=-1)


def cross_entropy_gradient(logits: torch.Tensor, logsumexp: torch.Tensor, safe_targets: torch.Tensor,
                           row_scale: torch.Tensor) -> torch.Tensor:
    """(softmax(z) - onehot(target)) * row_scale for (N, V) logits, in the logits' dtype."""
    onehot = torch.arange(logits.size(1), device=logits.device)[None, :] == safe_targets[:, None]  # (N, V)
    return (((logits.float() - logsumexp[:, None]).exp() - onehot.float()) * row_scale[:, None]).to(logits.dtype)


@functools.cache
def compiled_loss_kernels() -> Tuple[Callable, Callable]:
    """`logsumexp_rows` and `cross_entropy_gradient` compiled once per process (shapes vary freely)."""
    return torch.compile(logsumexp_rows, dynamic=True), torch.compile(cross_entropy_gradient, dynamic=True)


class CompiledCrossEntropy(torch.autograd.Function):
    """`ChunkedCrossEntropy` with each direction one compiled loop over the logits instead of a Python
    loop of blocks: inductor reads each bf16 logit once, upcasts it in a register and never stores a
    float32 copy, forward (`logsumexp_rows`) and backward (`cross_entropy_gradient`). Measured 2.2x faster
    than the blocks for 1,024 rows of a 32k vocabulary in bf16 on a CPU. Same formulas as the blocks."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        counted = targets != IGNORE_INDEX  # (N,)
        safe_targets = targets.clamp(min=0)
        target_logits = logits.gather(1, safe_targets[:, None]).squeeze(1).float()  # (N,)
        logsumexp = compiled_loss_kernels()[0](logits)  # (N,)
        n_counted = counted.sum()
        ctx.save_for_backward(logits, safe_targets, logsumexp, counted, n_counted)
        return ((logsumexp - target_logits) * counted).sum() / n_counted

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        logits, safe_targets, logsumexp, counted, n_counted = ctx.saved_tensors
        row_scale = counted * (grad_loss / n_counted.clamp(min=1))  # (N,): 0 for ignored rows
        return compiled_loss_kernels()[1](logits, logsumexp, safe_targets, row_scale), None


def compiled_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """`chunked_cross_entropy` computed by `CompiledCrossEntropy` (training with --compile)."""
    return CompiledCrossEntropy.apply(logits, targets)


# ----------------------------------------------------------------------------------------------------
# Attention of short half-precision rows on a CPU
# ----------------------------------------------------------------------------------------------------


class TrainingForms(TorchFunctionMode):
    """Active around the training forward pass: `F.scaled_dot_product_attention` of short bf16 or fp16
    rows on a CPU is computed by the formula it stands for, `naive_attention` (lit_lora/model.py): two
    large matrix products around a softmax, instead of PyTorch's fused CPU kernel.

    The fused (flash) kernel walks the T x T scores in small blocks to keep memory at O(T), which is the
    right trade for long rows; for short ones its bf16 blocks are small matrix products with per-block
    softmax bookkeeping, and for 4 x 8 heads x 256 tokens it took 15.6 ms per layer forward and backward
    on a CPU, the plain formula 6.9 ms. The price is the (B, nh, T, S) probabilities kept for the backward
    pass, so only while they stay small: up to `max_scores_bytes` per layer (8 MiB, e.g. 4 rows x 8 heads
    x 256 x 256 in bf16). float32 and GPUs keep the fused kernels, which measured faster there.
    """

    max_scores_bytes = 8 << 20

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention and len(args) == 3:
            q, k, v = args
            mask, causal = kwargs.get("attn_mask"), kwargs.get("is_causal", False)
            scores_bytes = q.size(0) * q.size(1) * q.size(2) * k.size(2) * q.element_size()
            if (q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16) and k.size(1) == q.size(1)
                    and scores_bytes <= self.max_scores_bytes and not kwargs.get("dropout_p")
                    and kwargs.get("scale") is None and not kwargs.get("enable_gqa")
                    and (mask is None) == bool(causal) and (mask is None or mask.dtype == torch.bool)):
                return naive_attention(q, k, v, mask)  # mask None: causal
        return func(*args, **kwargs)


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


# ----------------------------------------------------------------------------------------------------
# A compiled training step
# ----------------------------------------------------------------------------------------------------


def compile_for_training(model: torch.nn.Module, device: torch.device, dtype: torch.dtype,
                         strategy: str = "auto") -> Tuple[torch.nn.Module, Optional[str]]:
    """`torch.compile(model)` for training, or the model itself where it cannot compile; returns it and a
    one-line note saying why not (None when compiled). Compiling happens at the first forward pass.

    Replaces the eager forward and backward, where every norm, rotary rotation, SwiGLU product, residual
    add and cast is a separate pass over memory and a separate dispatch (~20 per layer, forward and
    backward); inductor fuses them into a few loops, and AOTAutograd plans the backward ahead. On a CPU
    with native bf16, `max-autotune-no-cudagraphs` also replaces oneDNN's matrix products by inductor's
    own C++ GEMM templates tuned for each shape (see benchmarks/benchmark_finetune.py for measurements).
    Costs: tens of seconds of compiling at the first step and at the first validation (eval mode and
    no_grad are other graphs), and again once when a batch of a new length arrives (the graph is then
    recompiled with a symbolic length, which serves every later length). Packed rows (`--train.packing`)
    all have one shape. Generation during training stays eager (`loop.model.module`). Dropout draws its
    masks from torch's own generator, as in eager mode, so a compiled run reproduces an eager one (to
    float rounding) and resumes from the RNG state in its checkpoints.
    """
    if strategy == "fsdp":
        return model, "--compile is not used with --strategy fsdp (training continues eagerly)"
    if device.type == "cpu":
        compilers = [os.environ.get("CXX"), "g++", "clang++", "c++"]
        if not any(name and shutil.which(name) for name in compilers):
            return model, "--compile needs a C++ compiler on a CPU (none found: set CXX); training continues eagerly"
    elif device.type == "cuda":
        try:
            import triton  # noqa: F401  (inductor's GPU code generator)
        except ImportError:
            return model, "--compile needs triton on a GPU (pip install triton); training continues eagerly"
    else:
        return model, f"--compile is not supported on {device.type}; training continues eagerly"
    torch._dynamo.config.suppress_errors = True  # an unexpected compiler failure runs that code eagerly instead
    torch._inductor.config.fallback_random = True  # dropout draws from torch's RNG, as eagerly: same masks, same resume
    tuned_gemms = device.type == "cpu" and dtype == torch.bfloat16
    return torch.compile(model, mode="max-autotune-no-cudagraphs" if tuned_gemms else None), None

