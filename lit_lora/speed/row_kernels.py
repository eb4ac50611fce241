"""The C++ decoding kernels (lit_lora/speed/row_kernels.cpp), built on first use: speed machinery.

    kernel      replaces                                       why it is faster
    int8_rows   x @ (q * scale[:, None]).T, a few rows x       reads 1 byte per weight and multiplies in
                (lit_lora/speed/int8.py)                             integers, without a float copy of W
    bf16_rows   F.linear(x, W) of up to 16 bf16 rows,          one AVX512-BF16 instruction per 32 weights
                compiled (OneTokenForms, lit_lora/speed/decoding.py)    instead of widening each to float32

Both exist to read the weights of a one-token decoding step at the speed of the memory; the .cpp file
explains the arithmetic. torch.utils.cpp_extension compiles it with the instructions this CPU has, the
first time a process asks (~10 s; then cached by torch in ~/.cache/torch_extensions), which needs a C++
compiler and ninja; without them, one warning, and the callers take their plain paths.
"""

import functools
import warnings
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import torch


MAX_ROWS = 16  # rows of x the callers hand the kernels: decoding up to 16 prompts; longer inputs are matrix products
K_STEP = 32  # the kernels' loop step (kBlock in the .cpp): the inputs per row must be a multiple of it


class RowKernels(NamedTuple):
    """The built kernels as callables, None where they could not be built; `bf16_rows` is None too where
    the CPU has no AVX512-BF16 (there, inductor's own loop is as fast as a hand-written one)."""

    int8_rows: Optional[Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]]  # (x, q, scale) -> (N, O)
    bf16_rows: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]      # (x, w) -> (N, O)


def cpu_has_avx512_bf16() -> bool:
    """Whether this CPU has AVX512-BF16, asked at run time (torch's probe, else /proc/cpuinfo)."""
    check = getattr(torch.cpu, "_is_avx512_bf16_supported", None)  # a private helper; absent in some builds
    if check is not None:
        return bool(check())
    try:
        return "avx512_bf16" in Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False


@functools.cache
def row_kernels() -> RowKernels:
    """`torch.ops.lit_lora.int8_rows` and `bf16_rows`, built from lit_lora/speed/row_kernels.cpp for this CPU:
    with AVX2 where PyTorch uses it (its AVX512 level implies AVX2), with AVX512-BF16 where the CPU has it
    and PyTorch uses AVX512. Both None, after one warning, where the file cannot be built."""
    from torch.utils import cpp_extension  # imported here: it is slow to import and only the CPU needs it

    capability = torch.backends.cpu.get_cpu_capability()  # follows ATEN_CPU_CAPABILITY when it is set
    native_bf16 = capability == "AVX512" and cpu_has_avx512_bf16()
    if capability not in ("AVX2", "AVX512"):
        variant, flags = "plain", []
    elif native_bf16:
        variant, flags = "avx512bf16", ["-mavx2", "-mavx512f", "-mavx512bf16"]
    else:
        variant, flags = "avx2", ["-mavx2"]
    try:
        cpp_extension.load(name=f"lit_lora_row_kernels_{variant}", sources=[str(Path(__file__).with_name("row_kernels.cpp"))],
                           extra_cflags=["-O3", "-fopenmp"] + flags,
                           extra_ldflags=["-fopenmp"], is_python_module=False)  # OpenMP: at::parallel_for's threads
    except Exception as error:  # a missing compiler is pages of build log: keep its first line
        first_line = (str(error).strip().splitlines() or [""])[0]
        warnings.warn(f"the decoding kernels lit_lora/speed/row_kernels.cpp could not be built ({type(error).__name__}: "
                      f"{first_line}); int8 and bf16 decoding fall back to slower products")
        return RowKernels(int8_rows=None, bf16_rows=None)

    @torch.library.register_fake("lit_lora::int8_rows")
    def _(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:  # shapes for torch.compile
        return x.new_empty(x.size(0), q.size(0))

    @torch.library.register_fake("lit_lora::bf16_rows")
    def _(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return x.new_empty(x.size(0), w.size(0))

    return RowKernels(torch.ops.lit_lora.int8_rows, torch.ops.lit_lora.bf16_rows if native_bf16 else None)
