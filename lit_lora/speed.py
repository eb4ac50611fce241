"""The speed room, decoding half: each piece does what a plain line of PyTorch does, only faster; the
teaching files (generate.py) stay plain and lit_lora/inference.py calls these where they measurably help.

    piece                          replaces                                        why it is faster
    cpu_supports_fast_bf16         assuming bf16 is fast                           bf16 only where the CPU has it
    compile_for_decoding           eager decoding                                  fused per-token kernels

Int8 weight-only decoding (`Int8Linear`) is a quantization scheme and lives in lit_lora/int8.py; the
training half of this room is lit_lora/speed_training.py. benchmarks/benchmark_generate.py prints the
same-run ratios.
"""

import logging
from pathlib import Path
from typing import Callable

import torch

from lit_lora.generate import generate
from lit_lora.model import Llama

# ----------------------------------------------------------------------------------------------------
# What the CPU can do, and compiled decoding
# ----------------------------------------------------------------------------------------------------


def cpu_supports_fast_bf16() -> bool:
    """Whether this CPU has native bf16 arithmetic (AVX512-BF16 or AMX), asked at run time: without
    it, bf16 matrix products are emulated and slower than float32."""
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        check = getattr(torch.cpu, probe, None)  # private helpers of torch.cpu; absent in some builds
        if check is not None and check():
            return True
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def compile_for_decoding(model: Llama, prompt_ids: torch.Tensor) -> Callable[..., torch.Tensor]:
    """`torch.compile` (inductor) the model for `generate(..., cache_length=model.config.block_size)`,
    and compile it now with a 3-token warm-up on `prompt_ids`. Returns the compiled model.

    Replaces eager decoding, where a small model on a CPU spends about half of each token in the Python
    and dispatch overhead of ~20 small operations per layer (norms, RoPE, cache writes); compiled, they
    become a few fused kernels. Costs: 10-60 s of compiling, again for every new adapter (the compiled
    code is only valid for the modules it saw), and a KV cache for the whole context on every call (one
    shape, so no recompiling: 2 GB for Llama-2-7B's 4096 positions in bf16). A CPU needs a C++ compiler.
    """
    torch.compiler.reset()  # the previous adapter's graphs are useless and count against dynamo's recompile limit
    compiled = torch.compile(model, dynamic=True)  # dynamic: the cache fills by one position every step
    graph_breaks = logging.getLogger("torch._dynamo.variables.tensor")
    level = graph_breaks.level
    graph_breaks.setLevel(logging.ERROR)  # the graph break at int(input_pos[-1]) (the cache's fill) is expected
    try:
        generate(compiled, prompt_ids, 3, temperature=0.0, cache_length=model.config.block_size)  # prefill and decoding
    except Exception as error:  # inductor's failures are pages of traceback from deep inside torch
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise ValueError(f"compiling the model failed ({type(error).__name__}: {first_line}); run without --compile "
                         "(on a CPU it needs a working C++ compiler)") from error
    finally:
        graph_breaks.setLevel(level)
    return compiled
