"""QLoRA from scratch: 4-bit NormalFloat base weights, double quantization, LoRA on top (the lesson).

QLoRA (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs") finetunes a model whose
frozen base weights are stored in 4 bits, while the LoRA factors A and B (lit_lora/lora.py) train in
16/32 bit. Llama-2-7B's weights take 13.5 GB in bf16 and ~3.9 GB this way, so the model, its LoRA
optimizer state and the activations of a 512-token batch fit a 24 GB GPU, or even a 12 GB one.

Why only the base is compressed
-------------------------------
LoRA never changes W: the forward pass reads it, the backward pass reads it again to send the gradient
on to x (dL/dx = dL/dh W), and that is all. So W can be stored in any compact form that turns back into
a 16-bit matrix quickly. The storage data type (NF4) and the computation data type (bf16) differ:

    packed NF4 codes + scales ──dequantize──► W (bf16, one layer at a time) ──► h = x W^T + s B A x
         frozen buffers                        a temporary, freed after use       A, B: 16/32-bit
                                                                                  Parameters that get
                                                                                  every gradient

1. NormalFloat4: 16 values placed where a normal distribution puts equal probability (section 3)
-----------------------------------------------------------------------------------------------
Pretrained weights are close to normally distributed. Divide a block of them by its largest absolute
value and the block lies in [-1, 1] with (almost) always the same shape of distribution, so one fixed
table of 16 values fits every block. For a known distribution the best 16-value table puts the same
probability mass in each of the 16 bins: its values are quantiles of the distribution ("quantile
quantization": every 4-bit code is used about equally often, so none of the 4 bits is wasted).
`nf4_code()` builds it:

  * 8 values for the positive half: the normal quantiles at 8 probabilities spaced evenly from
    0.9677 down towards 0.5 (0.5 itself excluded); 7 for the negative half the same way; plus an
    exact 0. Zero must be exact (padding and zero weights stay zero), and with an exact 0, 16 values
    cannot be symmetric: the extra value goes to the positive side.
  * Why 0.9677 and not 1: the quantile at probability 1 is infinite. 0.9677083 is the mean of
    1 - 1/(2*15) and 1 - 1/(2*16), the centres of the outermost bins of 15- and 16-bin grids.
  * Scaled so the outermost values are exactly -1 and 1 (the block's absmax itself is exact).

      -1    -.70  -.53 -.39 -.28 -.18 -.09  0  .08 .16 .25 .34 .44 .56  .72      1
       |------|-----|----|----|---|----|---|---|---|---|----|----|-----|------|
       dense near 0, where most weights are; sparse in the tails (a uniform grid, int4, is not)

2. Blockwise absmax quantization, blocks of 64 (section 2, "Block-wise k-bit Quantization")
-----------------------------------------------------------------------------------------
The weight matrix is flattened (row-major) and cut into blocks of 64 values; the last block may be
shorter. Each block stores its absmax c = max |w| (float32) and, per weight, the index of the table
value nearest to w / c. One outlier therefore coarsens only its own 64 neighbours, not a whole row.

    w  ──► / c ──► nearest of the 16 NF4 values ──► index 0..15 (4 bits)
    w' = NF4[index] * c                              (dequantization)

Two indices share one byte, the first in the high nibble:  byte = (i0 << 4) | i1.

    weights  w0 w1 | w2 w3 | ...      ->   bytes  [i0 i1] [i2 i3] ...      (n / 2 bytes)

3. Double quantization: quantize the quantization constants (section 3)
----------------------------------------------------------------------
A float32 absmax per 64 weights costs 32/64 = 0.5 bits per parameter, 12.5 % on top of the 4 bits.
QLoRA quantizes these absmax values too: subtract their mean (they are all positive; centring them
lets a signed code use both halves), then quantize them blockwise like the weights, in blocks of
256, to 8 bits each with one float32 absmax per block. The 8-bit table (`dynamic_8bit_code()`) is
the dynamic tree code of Dettmers 2015 ("8-Bit Approximations for Parallelism in Deep Learning"): a
sign, a decimal exponent 10^-6..10^0 given by the number of leading zero bits, and the remaining bits
a linear fraction in [0.1, 1], so it keeps a few significant digits over seven orders of magnitude.

    bits per parameter      4-bit code   scales                          total
    NF4                     4            32 / 64               = 0.5     4.5
    NF4 + double quant      4            8 / 64 + 32 / (64*256) = 0.127  4.127  (saves 0.373 bits)

For Llama-2-7B's 6.5 B quantized parameters double quantization saves ~0.3 GB. `bits_per_parameter`
(lit_lora/speed/quantize.py) gives the formula, `quantized_storage` measures real buffers
(benchmarks/qlora_memory.py prints both).

4. Dequantize in the forward pass, and in the backward pass again
-----------------------------------------------------------------
`Linear4bit` keeps the codes and scales as buffers (an optimizer never sees them) and, on each call,
dequantizes the whole matrix to the input's dtype and multiplies. A plain `F.linear(x, W)` would let
autograd keep the dequantized W of every layer alive until the backward pass, i.e. the whole model in
16 bits again; `DequantizedMatmul` saves nothing and dequantizes once more in backward, where it is
needed only to compute dL/dx. No gradient is ever computed for W.

5. LoRA on top, and merging afterwards
--------------------------------------
`add_lora` wraps a `Linear4bit` like an `nn.Linear`; A and B are ordinary 16/32-bit Parameters created
in the layer's `compute_dtype`, and they receive all the gradient. Folding B A into a 4-bit W cannot be
done in place and reversibly (the sum is not an NF4 matrix), so `merge_lora_quantized` dequantizes, adds in
float32, and either keeps the merged matrix in 16 bits (exactly what the trained model computed) or
requantizes it (4-bit size again, but the rounding now also hits the learned update: the result is no
longer the model that was evaluated during training; measure before shipping it).


How to use it
-------------
This file holds the format and the layer; lit_lora/speed/quantize.py applies it to whole models:

    model = load_checkpoint_quantized(checkpoint_dir, mode="nf4-dq", dtype=torch.bfloat16)   # 7B: ~3.9 GB
    add_lora(model, LoRAConfig(r=8, alpha=16, targets=("q", "v")))
    mark_only_lora_as_trainable(model)
    ...train; save the adapter as for any base...
    merge_lora_quantized(model)                                  # optional: a plain 16-bit model

or on a model already in memory: `replaced = quantize_model(model, mode="nf4-dq")` (drop `replaced`
to free the 16-bit weights). On CUDA, `backend="bitsandbytes"` swaps in bitsandbytes' fused 4-bit
kernels instead (same format); the from-scratch path here is the default and the one the tests check.
"""

import math
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F


NF4_MODES = ("nf4", "nf4-dq")
NF4_BLOCK_SIZE = 64  # weights per absmax
SCALE_BLOCK_SIZE = 256  # absmax values per second-level scale (double quantization)


# ----------------------------------------------------------------------------------------------
# The two lookup tables
# ----------------------------------------------------------------------------------------------

def nf4_code() -> torch.Tensor:
    """The 16 NormalFloat4 values, sorted, from -1 to 1 (section 1 of the module docstring).

    Computed as QLoRA's reference code computes them (float32 grid, float64 quantiles, float32
    normalisation), so they equal bitsandbytes' table bit for bit."""
    outer = 0.9677083  # mean of 1 - 1/(2*15) and 1 - 1/(2*16): the normal quantile at 1 is infinite
    positive = torch.special.ndtri(torch.linspace(outer, 0.5, 9, dtype=torch.float32)[:-1].double())  # 8 > 0
    negative = -torch.special.ndtri(torch.linspace(outer, 0.5, 8, dtype=torch.float32)[:-1].double())  # 7 < 0
    values = torch.cat([positive, negative, torch.zeros(1, dtype=torch.float64)]).float().sort().values
    return values / values.max()  # (16,): -1 ... 0 ... 1


def dynamic_8bit_code() -> torch.Tensor:
    """The 256 values of the signed 8-bit dynamic tree code (Dettmers 2015), sorted, in [-1, 1].

    For exponent e = 0..6 there are 2^e fraction values: the midpoints of 2^e equal steps between 0.1
    and 1, times 10^(e - 6), each with both signs (2 * 127 values), plus 0 and 1. Small magnitudes get
    few fraction bits, large ones many: a few significant digits from 1e-7 up to 1."""
    values = [0.0, 1.0]
    for exponent in range(7):
        steps = torch.linspace(0.1, 1.0, 2 ** exponent + 1, dtype=torch.float32)
        fractions = (steps[:-1] + steps[1:]) / 2 * 10.0 ** (exponent - 6)  # (2^e,)
        values += fractions.tolist() + (-fractions).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)  # (256,)


NF4_CODE = nf4_code()
DYNAMIC_8BIT_CODE = dynamic_8bit_code()


# ----------------------------------------------------------------------------------------------
# Blockwise quantization: the same algorithm for the 4-bit weights and the 8-bit scales
# ----------------------------------------------------------------------------------------------

def quantize_blockwise(values: torch.Tensor, code: torch.Tensor, block_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Flatten `values`, cut it into blocks of `block_size` (the last one may be shorter) and return
    (indices, absmax): for every value the index (uint8) of the `code` entry nearest to value / absmax
    of its block, padded with the index of 0 to a whole number of blocks, and the float32 absmax of
    each block. `code` must be sorted and contain 0.

    Naive version: indices = argmin_j |values / absmax - code[j]|. `bucketize` finds the same index by
    comparing with the midpoints between neighbouring code values, without the (n, len(code)) matrix;
    a value exactly on a midpoint goes to the lower one."""
    if not values.is_floating_point():
        raise ValueError(f"only floating-point tensors can be quantized, got {values.dtype}")
    n = values.numel()
    n_blocks = math.ceil(n / block_size)
    blocks = torch.zeros(n_blocks, block_size, dtype=torch.float32, device=values.device)  # zero-padded copy
    blocks.view(-1)[:n] = values.reshape(-1)
    absmax = torch.linalg.vector_norm(blocks, ord=math.inf, dim=1)  # (n_blocks,) max |value| per block
    if not torch.isfinite(absmax).all():
        raise ValueError("cannot quantize a tensor that contains NaN or infinite values")
    # Multiply by the reciprocal, as bitsandbytes does (an all-zero block keeps absmax 0 and maps to 0).
    blocks.mul_(1.0 / absmax.clamp(min=1e-38)[:, None])  # (n_blocks, block_size), now in [-1, 1]
    code = code.to(blocks.device)
    midpoints = (code[:-1] + code[1:]) / 2
    indices = torch.bucketize(blocks.view(-1), midpoints, out_int32=True).to(torch.uint8)  # (n_blocks * block_size,)
    return indices, absmax


def dequantize_blockwise(indices: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, block_size: int,
                         numel: int) -> torch.Tensor:
    """code[index] * absmax of its block for the first `numel` indices: a flat float32 tensor."""
    scale = absmax.float().repeat_interleave(block_size)[:numel]  # (numel,) each block's absmax, repeated
    return code.to(indices.device)[indices[:numel].int()] * scale


def pack_4bit(indices: torch.Tensor) -> torch.Tensor:
    """Two 4-bit indices per byte, the first in the high nibble: (2 m,) uint8 -> (m,)."""
    return (indices[0::2] << 4) | indices[1::2]


def unpack_4bit(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of `pack_4bit`: (m,) bytes -> (2 m,) indices 0..15."""
    return torch.stack((packed >> 4, packed & 0x0F), dim=1).view(-1)  # (m, 2): high nibble, low nibble


def quantize_nf4(weight: torch.Tensor, block_size: int = NF4_BLOCK_SIZE) -> Tuple[torch.Tensor, torch.Tensor]:
    """A float tensor -> (packed NF4 codes (ceil(n / 2),) uint8, absmax (ceil(n / block_size),) float32)."""
    indices, absmax = quantize_blockwise(weight, NF4_CODE, block_size)
    # An odd count is completed by the next padding index, which encodes 0.
    return pack_4bit(indices[:2 * math.ceil(weight.numel() / 2)]), absmax


def dequantize_nf4(packed: torch.Tensor, absmax: torch.Tensor, shape: Sequence[int], dtype: torch.dtype = torch.float32,
                   block_size: int = NF4_BLOCK_SIZE) -> torch.Tensor:
    """(packed codes, absmax) -> the tensor of `shape`, computed in float32 and rounded once to `dtype`."""
    numel = math.prod(shape)
    return dequantize_blockwise(unpack_4bit(packed), absmax, NF4_CODE, block_size, numel).view(*shape).to(dtype)


def quantize_absmax(absmax: torch.Tensor, block_size: int = SCALE_BLOCK_SIZE) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Double quantization of the per-block absmax values: (codes uint8 (n,), scales float32
    (ceil(n / block_size),), offset float32 ()). absmax ~ DYNAMIC_8BIT_CODE[code] * scale + offset."""
    offset = absmax.mean()  # the absmax values are all positive: centre them for the signed code
    codes, scales = quantize_blockwise(absmax - offset, DYNAMIC_8BIT_CODE, block_size)
    return codes[:absmax.numel()], scales, offset


def dequantize_absmax(codes: torch.Tensor, scales: torch.Tensor, offset: torch.Tensor,
                      block_size: int = SCALE_BLOCK_SIZE) -> torch.Tensor:
    """The inverse of `quantize_absmax` (up to its rounding): float32 (n,)."""
    return dequantize_blockwise(codes, scales, DYNAMIC_8BIT_CODE, block_size, codes.numel()) + offset


# ----------------------------------------------------------------------------------------------
# The frozen 4-bit linear layer
# ----------------------------------------------------------------------------------------------

class DequantizedMatmul(torch.autograd.Function):
    """h = x W^T with W dequantized on the fly, forward and backward (Linear4bit, Int8Linear).

    Saving nothing is the point: `F.linear(x, layer.dequantize())` would make autograd keep every
    layer's 16-bit W until the backward pass. W is frozen, so the only gradient is dL/dx = dL/dh W."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        ctx.layer = layer  # its buffers live anyway: keeping a reference costs nothing
        return F.linear(x, layer.dequantize(x.dtype))  # (..., in) -> (..., out)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> Tuple[Optional[torch.Tensor], None]:
        grad_x = grad_output @ ctx.layer.dequantize(grad_output.dtype) if ctx.needs_input_grad[0] else None  # (..., in)
        return grad_x, None


class Linear4bit(nn.Module):
    """A frozen bias-free linear layer stored as NF4: h = x W^T with W dequantized in each call.

    Buffers (in the state dict, never Parameters, so no optimizer touches them):
        packed_weight   uint8 (ceil(out * in / 2),)   two 4-bit codes per byte, row-major
        mode "nf4":     absmax         float32 (n_blocks,)        one per 64 weights
        mode "nf4-dq":  absmax_codes   uint8 (n_blocks,)          8-bit codes of absmax - offset
                        absmax_scales  float32 (ceil(n_blocks / 256),)
                        absmax_offset  float32 ()                 the mean absmax

    `in_features` and `out_features` are those of the nn.Linear it replaces; `compute_dtype` is the
    dtype `dequantize()` returns by default and the dtype LoRA factors on top of it are created in.
    `forward` computes in the input's dtype. There is no `weight` attribute on purpose: code that
    would modify `weight` in place (e.g. a LoRA merge) must not silently write into a temporary.
    """

    def __init__(self, in_features: int, out_features: int, mode: str = "nf4-dq",
                 compute_dtype: torch.dtype = torch.float32, device: Optional[Union[str, torch.device]] = None) -> None:
        """An empty layer (`load_weight` fills it); use `Linear4bit.from_weight` to quantize a matrix."""
        super().__init__()
        if mode not in NF4_MODES:
            raise ValueError(f"unknown 4-bit quantization mode {mode!r}; choose one of {', '.join(NF4_MODES)}")
        self.in_features, self.out_features, self.mode, self.compute_dtype = in_features, out_features, mode, compute_dtype
        n_blocks = math.ceil(in_features * out_features / NF4_BLOCK_SIZE)
        self.register_buffer("packed_weight", torch.empty(math.ceil(in_features * out_features / 2), dtype=torch.uint8, device=device))
        if mode == "nf4":
            self.register_buffer("absmax", torch.empty(n_blocks, dtype=torch.float32, device=device))
        else:
            self.register_buffer("absmax_codes", torch.empty(n_blocks, dtype=torch.uint8, device=device))
            self.register_buffer("absmax_scales", torch.empty(math.ceil(n_blocks / SCALE_BLOCK_SIZE), dtype=torch.float32, device=device))
            self.register_buffer("absmax_offset", torch.empty((), dtype=torch.float32, device=device))

    @classmethod
    def from_weight(cls, weight: torch.Tensor, mode: str = "nf4-dq") -> "Linear4bit":
        """Quantize a float (out, in) matrix; the layer computes in `weight.dtype` by default. A meta
        `weight` gives an empty shell with the right buffers."""
        out_features, in_features = weight.shape
        layer = cls(in_features, out_features, mode, compute_dtype=weight.dtype, device=weight.device)
        if weight.device.type != "meta":
            layer.load_weight(weight)
        return layer

    @torch.no_grad()
    def load_weight(self, weight: torch.Tensor) -> None:
        """Quantize `weight` (out, in) into this layer's existing buffers (a model allocated up front,
        as by `load_checkpoint_quantized`, is filled in place)."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight of shape {tuple(weight.shape)} does not fit a Linear4bit "
                             f"({self.out_features}, {self.in_features})")
        packed, absmax = quantize_nf4(weight.to(self.packed_weight.device))
        self.packed_weight.copy_(packed)
        if self.mode == "nf4":
            self.absmax.copy_(absmax)
        else:
            for buffer, value in zip((self.absmax_codes, self.absmax_scales, self.absmax_offset), quantize_absmax(absmax)):
                buffer.copy_(value)

    def block_absmax(self) -> torch.Tensor:
        """The per-block absmax (float32), dequantized first in mode nf4-dq."""
        if self.mode == "nf4":
            return self.absmax
        return dequantize_absmax(self.absmax_codes, self.absmax_scales, self.absmax_offset)

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """W as a dense (out, in) tensor in `dtype` (default `compute_dtype`)."""
        return dequantize_nf4(self.packed_weight, self.block_absmax(), (self.out_features, self.in_features),
                              dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return DequantizedMatmul.apply(x, self)  # (..., in) -> (..., out)

    def _apply(self, fn, recurse=True):
        # Module.to(device) must move the quantization state, but Module.to(torch.bfloat16) (e.g. Fabric's
        # bf16-true precision) must not round the float32 scales: a cast only changes compute_dtype.
        self.compute_dtype = fn(torch.empty(0, dtype=self.compute_dtype, device=self.packed_weight.device)).dtype
        exact = dict(self._buffers)
        super()._apply(fn, recurse)
        for name, before in exact.items():
            if self._buffers[name].dtype != before.dtype:
                self._buffers[name] = before.to(self._buffers[name].device)
        return self

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}, compute_dtype={self.compute_dtype}"
