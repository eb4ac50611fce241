"""The speed room, decoding half: each piece does what a plain line of PyTorch does, only faster; the
teaching files (generate.py) stay plain and lit_lora/inference.py calls these where they measurably help.

    piece                          replaces                                        why it is faster
    cpu_supports_fast_bf16         assuming bf16 is fast                           bf16 only where the CPU has it
    CompiledDecoding               model(idx, input_pos), one token per row        one fixed-shape graph, fused
                                                                                   kernels, no per-op dispatch

Int8 weight-only decoding (`Int8Linear`) is a quantization scheme and lives in lit_lora/int8.py; the
training half of this room is lit_lora/speed_training.py. benchmarks/benchmark_generate.py prints the
same-run ratios.
"""

from pathlib import Path
from typing import Optional

import torch

from lit_lora.generate import generate
from lit_lora.model import Llama, cached_positions_and_mask, rope_cos_sin

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


class CompiledDecoding(torch.nn.Module):
    """`model` for `generate`, with its one-token decoding steps compiled into one graph of fixed shapes.

    Replaces `model(idx, input_pos)` for one new token per row, which is the plain lesson: it attends to
    the filled part of the KV cache, `k[:, :, :end]` with `end = input_pos + 1`, a length that changes at
    every token (and reading it from the tensor stops a compiler's graph). Here the step attends to the
    whole preallocated cache instead, the slots not written yet masked out (`cached_positions_and_mask`
    with end = the cache's length): the same softmax, since a masked key gets weight 0, over shapes that
    never change. So the step compiles once, without a graph break, into a few fused C++ loops around
    the matrix products, called from C++ (inductor's `cpp_wrapper`): the eager step's ~20 dispatched
    operations per layer cost ~2 ms per token on a CPU, the compiled one's ~0.7 ms. Prompts (several tokens)
    run eagerly. Costs: compiling at the first step (~20 s on a CPU) and again for another batch size or
    cache length, and attention over the whole cache at every step (the cache is sized for the call).
    A CPU needs a C++ compiler.
    """

    def __init__(self, model: Llama, backend: str = "inductor") -> None:
        super().__init__()
        self.model = model
        cpu = model.tok_embeddings.weight.device.type == "cpu"
        options = {"cpp_wrapper": True} if cpu and backend == "inductor" else None
        self.step = torch.compile(self.decode_step, fullgraph=True, dynamic=False, backend=backend, options=options)

    # What `generate` uses of a model besides calling it
    @property
    def config(self):
        return self.model.config

    @property
    def tok_embeddings(self) -> torch.nn.Embedding:
        return self.model.tok_embeddings

    @property
    def layers(self) -> torch.nn.ModuleList:
        return self.model.layers

    def set_kv_cache(self, *args, **kwargs) -> None:
        self.model.set_kv_cache(*args, **kwargs)

    def clear_kv_cache(self) -> None:
        self.model.clear_kv_cache()

    def forward(self, idx: torch.Tensor, input_pos: Optional[torch.Tensor] = None, *,
                left_pad: Optional[torch.Tensor] = None) -> torch.Tensor:
        if input_pos is None or idx.size(1) != 1:  # a prompt: eagerly
            return self.model(idx, input_pos, left_pad=left_pad)
        return self.step(idx, input_pos, left_pad)

    def decode_step(self, idx: torch.Tensor, input_pos: torch.Tensor, left_pad: Optional[torch.Tensor]) -> torch.Tensor:
        """`Llama.forward(idx, input_pos, left_pad=left_pad)` for idx (B, 1), over the whole cache."""
        model = self.model
        cache_length = model.layers[0].attn.kv_cache.k.size(2)
        positions, mask = cached_positions_and_mask(input_pos, cache_length, left_pad)  # mask (.., 1, S)
        cos, sin = rope_cos_sin(positions, model.config.head_size, model.config.rope_theta, model.tok_embeddings.weight.dtype)
        x = model.tok_embeddings(idx)  # (B, 1, C)
        for block in model.layers:
            x = block(x, cos, sin, input_pos, mask)
        return model.lm_head(model.norm(x))  # (B, 1, V)


def compile_for_decoding(model: Llama, prompt_ids: torch.Tensor, cache_length: Optional[int] = None) -> CompiledDecoding:
    """`CompiledDecoding(model)`, compiled now by a 3-token warm-up on `prompt_ids` with a KV cache of
    `cache_length` positions (pass `generate` the same; default: the model's context). The compiled code is
    only valid for the modules it saw: compile again after applying another adapter. Returns it."""
    torch.compiler.reset()  # the previous adapter's graphs are useless and count against dynamo's recompile limit
    compiled = CompiledDecoding(model)
    try:
        generate(compiled, prompt_ids, 3, temperature=0.0, cache_length=cache_length or model.config.block_size)
    except Exception as error:  # inductor's failures are pages of traceback from deep inside torch
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise ValueError(f"compiling the model failed ({type(error).__name__}: {first_line}); run without --compile "
                         "(on a CPU it needs a working C++ compiler)") from error
    return compiled
