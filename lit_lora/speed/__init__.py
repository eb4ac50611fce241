"""The speed room: faster forms of what the teaching files compute plainly, each naming the plain formula
it replaces and why it is faster.

    decoding.py     the CPU probes, the compiled fixed-shape decoding step and its one-row forms
    training.py     the chunked and compiled cross entropy, the attention of short bf16 rows on a CPU,
                    the bf16 output plugin, the malloc setting, the compiled training step
    row_kernels.py  the C++ decoding kernels (row_kernels.cpp: bf16 and int8 weights times a few rows),
                    built on first use
    int8.py         int8 weight-only layers for decoding
    quantize.py     quantization schemes (nf4, nf4-dq, int8) applied to whole models and checkpoints

May import: the teaching files and `lit_lora.files`. `lit_lora.train` calls into it (the faster loss,
attention and quantized loading), so nothing here may import `train` or `methods`. This __init__ imports
nothing up front, so generation never pays for Lightning, which only the training half needs.
"""

import importlib
import warnings


def __getattr__(name):
    """`from lit_lora.speed import CompiledDecoding`, from when this package was one file (speed.py), keeps
    working for one release, with a DeprecationWarning naming the new module."""
    decoding = importlib.import_module(f"{__name__}.decoding")
    if name.startswith("__") or not hasattr(decoding, name):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn(f"{__name__}.{name} moved to {__name__}.decoding.{name}; the old name goes in the next release",
                  DeprecationWarning, stacklevel=2)
    return getattr(decoding, name)
