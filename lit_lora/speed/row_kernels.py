"""The C++ decoding kernels (lit_lora/speed/row_kernels.cpp), built on first use: speed machinery.

    kernel      replaces                                       why it is faster
    int8_rows   x @ (q * scale[:, None]).T, a few rows x       reads 1 byte per weight and multiplies in
                (lit_lora/speed/int8.py)                             integers, without a float copy of W
    bf16_rows   F.linear(x, W) of up to 16 bf16 rows,          one AVX512-BF16 instruction per 32 weights
                compiled (OneTokenForms, lit_lora/speed/decoding.py)    instead of widening each to float32

Both exist to read the weights of a one-token decoding step at the speed of the memory; the .cpp file
explains the arithmetic. torch.utils.cpp_extension compiles it with the instructions this CPU has, the
first time any process asks (~40 s; then cached by torch in ~/.cache/torch_extensions), which needs a C++
compiler and ninja; without them, one line says so, and the callers take their plain paths.

What can go wrong with a cache shared by every run, and what happens instead of a hang or a crash:
  * a build killed midway leaves torch's `lock` file, on which every later build would wait forever: the
    build runs in a child process with a time limit, and a lock older than that limit is removed;
  * a library cut short (the same killed build) would crash this process with a bus error when loaded,
    and a foreign one (other sources under the same name) lacks the kernels: the cached library is
    checked before it is loaded here (a whole ELF file, the kernels' messages inside), and built again if
    it fails; the child that builds it loads it first, so a bad build crashes the child, not this process.
"""

import functools
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, List, NamedTuple, Optional, Tuple

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


BUILD_TIMEOUT_S = 300  # a build takes ~40 s; torch's lock older than this was left by a build that died
BUILDING_NOTE = "building the decoding kernels (first use, ~40 s)"
FALLBACK = "int8 and bf16 decoding fall back to slower products"
MARKS = (b"int8_rows: x (N, K)", b"bf16_rows: x (N, K)")  # the .cpp's own messages: in every build of it
NO_KERNELS = RowKernels(int8_rows=None, bf16_rows=None)

# Run by the child process that builds (and so first loads) the library: torch only, nothing of lit_lora.
BUILD_IN_CHILD = """
import sys, torch
from torch.utils import cpp_extension
name, source, flags = sys.argv[1], sys.argv[2], sys.argv[3:]
cpp_extension.load(name=name, sources=[source], extra_cflags=["-O3", "-fopenmp", *flags], extra_ldflags=["-fopenmp"],
                   is_python_module=False)  # OpenMP: at::parallel_for's threads
torch.ops.lit_lora.int8_rows, torch.ops.lit_lora.bf16_rows  # the library defines both kernels
"""


def kernel_variant() -> Tuple[str, List[str], bool]:
    """(extension name, compiler flags, whether bf16_rows is used) for this CPU: with AVX2 where PyTorch uses
    it (its AVX512 level implies AVX2), with AVX512-BF16 where the CPU has it and PyTorch uses AVX512."""
    capability = torch.backends.cpu.get_cpu_capability()  # follows ATEN_CPU_CAPABILITY when it is set
    native_bf16 = capability == "AVX512" and cpu_has_avx512_bf16()
    if capability not in ("AVX2", "AVX512"):
        variant, flags = "plain", []
    elif native_bf16:
        variant, flags = "avx512bf16", ["-mavx2", "-mavx512f", "-mavx512bf16"]
    else:
        variant, flags = "avx2", ["-mavx2"]
    return f"lit_lora_row_kernels_{variant}", flags, native_bf16


def library_problem(path: Path) -> Optional[str]:
    """Why the library at `path` must not be loaded into this process, or None. A file shorter than its own
    ELF headers say (a build killed while linking) would crash the process with a bus error; one without
    the kernels' own messages was built from other sources."""
    data = path.read_bytes()
    if len(data) < 64 or data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:  # 64-bit little-endian ELF
        return "not a shared library for this machine"
    program_headers, section_headers = struct.unpack_from("<QQ", data, 0x20)
    header_size, count = struct.unpack_from("<HH", data, 0x36)
    section_size, section_count = struct.unpack_from("<HH", data, 0x3A)
    ends = [program_headers + header_size * count, section_headers + section_size * section_count]
    for index in range(count):  # every segment the loader maps must be in the file
        offset, size = struct.unpack_from("<Q16xQ", data, program_headers + index * header_size + 8)
        ends.append(offset + size)
    if max(ends) > len(data):
        return f"cut short ({len(data):,} of at least {max(ends):,} bytes)"
    if not all(mark in data for mark in MARKS):
        return "not built from these kernels' sources"
    return None


def remove_stale_lock(build_dir: Path) -> None:
    """torch's `lock` in the build folder, removed when older than the longest build: the build that made it died."""
    lock = build_dir / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return
    if age > BUILD_TIMEOUT_S:
        lock.unlink(missing_ok=True)
        print(f"note: removed {lock}, left {age / 60:.0f} minutes ago by a build of the decoding kernels that did "
              "not finish", file=sys.stderr)


def build_in_child(name: str, source: Path, flags: List[str]) -> Optional[str]:
    """Build (or bring up to date) the library in a child process, within BUILD_TIMEOUT_S. Returns why it
    failed, in one line, or None."""
    child = subprocess.Popen([sys.executable, "-c", BUILD_IN_CHILD, name, str(source), *flags], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)  # its own group: ninja too
    try:
        _, errors = child.communicate(timeout=BUILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        child.communicate()
        return f"the build took more than {BUILD_TIMEOUT_S} s (another process building them? a lock left behind?)"
    if child.returncode == 0:
        return None
    lines = [line.strip() for line in errors.splitlines() if line.strip()]
    raised = [line for line in lines if line.split(":")[0].endswith(("Error", "Exception"))]
    return (raised or lines or [f"the build process exited with {child.returncode}"])[-1]


def missing_build_tools() -> Optional[str]:
    """What is missing to build the kernels (a C++ compiler, ninja), in words; None when both are there."""
    from torch.utils import cpp_extension

    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler found ({compiler!r}): install g++ (or clang) or point CXX at one"
    if not cpp_extension.is_ninja_available():
        return "ninja is not installed: pip install ninja"
    return None


@functools.cache
def row_kernels() -> RowKernels:
    """`torch.ops.lit_lora.int8_rows` and `bf16_rows`, built from lit_lora/speed/row_kernels.cpp for this CPU
    (`kernel_variant`), or a cached build of it checked first (`library_problem`). Both None, after one
    line on stderr saying why, where they cannot be had."""
    from torch.utils import cpp_extension  # imported here: it is slow to import and only the CPU needs it

    name, flags, native_bf16 = kernel_variant()
    source = Path(__file__).with_name("row_kernels.cpp")
    build_dir = Path(cpp_extension._get_build_directory(name, verbose=False))
    library = build_dir / f"{name}.so"
    remove_stale_lock(build_dir)
    problem = library_problem(library) if library.is_file() else "absent"
    if problem not in (None, "absent"):
        print(f"note: the cached decoding kernels {library} are {problem}: building them again", file=sys.stderr)
        library.unlink(missing_ok=True)
    if problem is not None or library.stat().st_mtime < source.stat().st_mtime:
        missing = missing_build_tools()
        if missing is not None:
            print(f"note: the decoding kernels cannot be built: {missing}; {FALLBACK}", file=sys.stderr)
            return NO_KERNELS
        print(BUILDING_NOTE, file=sys.stderr, flush=True)
        failure = build_in_child(name, source, flags)
        problem = failure or (library_problem(library) if library.is_file() else "absent after the build")
    if problem is not None:
        print(f"note: the decoding kernels {source} could not be built ({problem}); {FALLBACK}", file=sys.stderr)
        return NO_KERNELS
    try:
        torch.ops.load_library(str(library))
        int8_rows, bf16_rows = torch.ops.lit_lora.int8_rows, torch.ops.lit_lora.bf16_rows
    except (OSError, RuntimeError, AttributeError) as error:  # e.g. built against another torch
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        print(f"note: the decoding kernels {library} could not be loaded ({first_line}); {FALLBACK}", file=sys.stderr)
        return NO_KERNELS

    @torch.library.register_fake("lit_lora::int8_rows")
    def _(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:  # shapes for torch.compile
        return x.new_empty(x.size(0), q.size(0))

    @torch.library.register_fake("lit_lora::bf16_rows")
    def _(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return x.new_empty(x.size(0), w.size(0))

    return RowKernels(int8_rows, bf16_rows if native_bf16 else None)
