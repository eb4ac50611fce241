"""The speed room, decoding half: each piece does what a plain line of PyTorch does, only faster; the
teaching files (generate.py) stay plain and lit_lora/workflows/inference.py calls these where they measurably help.

    piece                          replaces                                        why it is faster
    cpu_supports_fast_bf16         assuming bf16 is fast                           bf16 only where the CPU has it
    CompiledDecoding               model(idx, input_pos), one token per row        one fixed-shape graph, fused
                                                                                   kernels, no per-op dispatch,
                                                                                   no guard checks per token
    OneTokenForms                  F.linear on one row, attention of one query     loops a compiler streams, or
                                                                                   lit_lora/speed/row_kernels.py's bf16
                                                                                   kernel (inside CompiledDecoding)

Int8 weight-only decoding (`Int8Linear`) is a quantization scheme and lives in lit_lora/speed/int8.py; the
training half of this room is lit_lora/speed/training.py. benchmarks/benchmark_generate.py prints the
same-run ratios.
"""

from pathlib import Path
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from lit_lora.generate import generate
from lit_lora.model import Llama, cached_positions_and_mask, rope_cos_sin
from lit_lora.speed.row_kernels import K_STEP, MAX_ROWS, cpu_has_avx512_bf16, row_kernels


# ----------------------------------------------------------------------------------------------------
# What the CPU can do, and compiled decoding
# ----------------------------------------------------------------------------------------------------


def cpu_supports_fast_bf16() -> bool:
    """Whether this CPU has native bf16 arithmetic (AVX512-BF16 or AMX), asked at run time: without
    it, bf16 matrix products are emulated and slower than float32."""
    if cpu_has_avx512_bf16():
        return True
    try:
        return "amx_bf16" in Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False


class OneTokenForms(TorchFunctionMode):
    """Two calls of the plain model rewritten, while the one-token decoding step is traced for compiling,
    into forms that inductor turns into loops streaming memory at close to its bandwidth. Same values,
    summed in another order (float32 greedy tokens match transformers'; benchmarks/benchmark_generate.py).

    `F.linear(x, W)` for x of one row (B = T = 1): `matvec_as_reduction`. Decoding one token multiplies
    one row by every weight of the model, so its time is reading the weights: oneDNN's matrix product for
    a single row read a 32k x 512 bf16 head at ~16 GB/s, the elementwise product and sum inductor
    generates (one vectorised pass over W per output block, both cores) at ~40 GB/s; float32 ~10 -> ~48.
    In bf16 on a CPU with AVX512-BF16, rows go to the C++ kernel `bf16_rows` instead (when given; built
    by lit_lora/speed/row_kernels.py), which multiplies 32 bf16 pairs per instruction where inductor's loop widens
    every weight to float32 first (the bf16 step about a fifth faster on 2 cores), and which reads W once
    for up to 16 rows, one per prompt of a batch, where the matrix product for a few rows reads it at a
    fraction of the memory's speed. Wider inputs keep the matrix products.

    `F.scaled_dot_product_attention` of one query per row: `one_query_attention`, two small matrix
    products around a float32 softmax. PyTorch's fused CPU kernel is built for long query blocks and took
    ~80 us per layer in bf16 for one query over a 160-slot cache, the two products ~7 us.
    """

    def __init__(self, bf16_rows: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None) -> None:
        super().__init__()
        self.bf16_rows = bf16_rows

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if bias is None and self._kernel_applies(x, weight):
                h = self.bf16_rows(x.reshape(-1, x.size(-1)), weight)  # (N, in) -> (N, out)
                return h.reshape(*x.shape[:-1], weight.size(0))  # (..., out)
            if bias is None and x.numel() == x.size(-1):
                return matvec_as_reduction(x, weight)
        elif func is F.scaled_dot_product_attention:
            q, k, v = args[:3]
            mask = args[3] if len(args) > 3 else kwargs.get("attn_mask")
            plain = (len(args) <= 4 and not kwargs.get("is_causal") and not kwargs.get("dropout_p")
                     and kwargs.get("scale") is None and (mask is None or mask.dtype == torch.bool))
            if plain and q.size(-2) == 1:
                return one_query_attention(q, k, v, mask)
        return func(*args, **kwargs)

    def _kernel_applies(self, x: torch.Tensor, weight: torch.Tensor) -> bool:
        """`bf16_rows`: up to MAX_ROWS bf16 rows on a CPU, a multiple of K_STEP inputs (its loop step), and
        no gradient to compute (the kernel has no backward)."""
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
        return (self.bf16_rows is not None and x.device.type == "cpu" and x.dtype == weight.dtype == torch.bfloat16
                and weight.size(1) % K_STEP == 0 and x.numel() <= MAX_ROWS * x.size(-1) and not needs_grad)


def matvec_as_reduction(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`F.linear(x, weight)` for one row x (..., in) and weight (out, in): h[o] = sum_i W[o, i] x[i], in float32."""
    return (x.unsqueeze(-2).float() * weight.float()).sum(-1).to(x.dtype)  # (..., 1, in) * (out, in) -> (..., out)


def one_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """`F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)` for one query per row:
    q (B, nh, 1, hs), k and v (B, nkv, S, hs), a boolean mask broadcastable to (B, 1, 1, S) or None."""
    B, nh, _, hs = q.shape
    nkv, S = k.size(1), k.size(2)
    # A view of q onto itself: nothing in eager mode; compiled, it makes inductor store the rotated query
    # once, where it otherwise recomputed the rotation inside the score loop, for each of the S keys.
    q = q.as_strided(q.shape, q.stride())
    q = q.reshape(B, nkv, nh // nkv, hs)  # (B, nkv, g, hs): the g query heads that share a key/value head
    scores = (q @ k.transpose(-1, -2)).float() * hs ** -0.5  # (B, nkv, g, S)
    if mask is not None:
        scores = scores.masked_fill(~mask.reshape(-1, 1, 1, S), float("-inf"))  # (1 or B, 1, 1, S)
    y = scores.softmax(dim=-1).to(v.dtype) @ v  # (B, nkv, g, hs)
    return y.reshape(B, nh, 1, hs)  # (B, nh, 1, hs)


class CompiledDecoding(torch.nn.Module):
    """`model` for `generate`, with its one-token decoding steps compiled into one graph of fixed shapes.

    Replaces `model(idx, input_pos)` for one new token per row, which is the plain lesson: it attends to
    the filled part of the KV cache, `k[:, :, :end]` with `end = input_pos + 1`, a length that changes at
    every token (and reading it from the tensor stops a compiler's graph). Here the step attends to the
    whole preallocated cache instead, the slots not written yet masked out (`cached_positions_and_mask`
    with end = the cache's length): the same softmax, since a masked key gets weight 0, over shapes that
    never change. So the step compiles once, without a graph break, into a few fused C++ loops around
    the matrix products, called from C++ (inductor's `cpp_wrapper`), with `OneTokenForms` for the
    products of one row. Three more savings per token:
      - the rotary tables of every cache position are computed once per cache length and indexed in the
        step: computed inside it, inductor recomputed the sines and cosines in every layer's attention loop;
      - a step whose shapes have been compiled before skips dynamo's guard checks (~0.3 ms per token for
        the ~150 parameters; `torch.compiler.set_stance(skip_guard_eval_unsafe=True)`), which is safe
        because what changes between calls (shapes, dtype, device, padding, modes) is checked here instead
        (and dynamo raises rather than recompiling silently under that stance);
      - the eager step's ~20 dispatched operations per layer are gone (~2 ms per token on a CPU).
    Prompts (several tokens) run eagerly. Costs: compiling at the first step (~20 s on a CPU) and again
    for another batch size or cache length, and attention over the whole cache at every step (the cache
    is sized for the call). A CPU needs a C++ compiler. The compiled code is only valid for the modules
    it saw: changing the model's modules (applying an adapter) needs a new `CompiledDecoding`.
    """

    def __init__(self, model: Llama, backend: str = "inductor") -> None:
        super().__init__()
        self.model = model
        cpu = model.tok_embeddings.weight.device.type == "cpu"
        options = {"cpp_wrapper": True} if cpu and backend == "inductor" else None
        self.step = torch.compile(self.decode_step, fullgraph=True, dynamic=False, backend=backend, options=options)
        bf16 = model.tok_embeddings.weight.dtype == torch.bfloat16
        self.bf16_rows = row_kernels().bf16_rows if cpu and bf16 else None  # built now, not while tracing
        self.compiled_shapes = set()  # (shapes, dtype, device, padding, modes) of each step compiled so far
        self.rope_table: Optional[Tuple[torch.Tensor, torch.Tensor]] = None

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
        cache = self.model.layers[0].attn.kv_cache.k  # (B, nkv, S, hs)
        cos, sin = self.rope_tables(cache.size(2))
        shapes = (tuple(idx.shape), tuple(cache.shape), cos.dtype, cos.device, left_pad is None, self.model.training,
                  torch.is_inference_mode_enabled(), torch.is_grad_enabled())
        if shapes not in self.compiled_shapes:
            logits = self.step(idx, input_pos, left_pad, cos, sin)  # compiles for these shapes
            self.compiled_shapes.add(shapes)
            return logits
        with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
            return self.step(idx, input_pos, left_pad, cos, sin)

    def rope_tables(self, cache_length: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """`rope_cos_sin` of positions 0 .. cache_length - 1, (S, hs) each, kept for the next call."""
        weight = self.model.tok_embeddings.weight
        table = self.rope_table
        if table is None or table[0].size(0) < cache_length or table[0].dtype != weight.dtype or table[0].device != weight.device:
            positions = torch.arange(cache_length, device=weight.device)
            cos, sin = rope_cos_sin(positions, self.config.head_size, self.config.rope_theta, weight.dtype,
                                    self.config.rope_scaling)  # (1, S, hs)
            self.rope_table = table = (cos[0], sin[0])
        return table[0][:cache_length], table[1][:cache_length]

    def decode_step(self, idx: torch.Tensor, input_pos: torch.Tensor, left_pad: Optional[torch.Tensor],
                    cos_table: torch.Tensor, sin_table: torch.Tensor) -> torch.Tensor:
        """`Llama.forward(idx, input_pos, left_pad=left_pad)` for idx (B, 1), over the whole cache."""
        model = self.model
        cache_length = cos_table.size(0)
        positions, mask = cached_positions_and_mask(input_pos, cache_length, left_pad)  # mask (.., 1, S)
        cos, sin = cos_table[positions].unsqueeze(-3), sin_table[positions].unsqueeze(-3)  # (1, 1, hs) or (B, 1, 1, hs)
        with OneTokenForms(self.bf16_rows):
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
