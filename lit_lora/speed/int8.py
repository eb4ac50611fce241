"""Weight-only int8 for decoding speed (`Int8Linear`, quantization mode "int8"): speed machinery.

Generating a token multiplies one activation row by every weight of the model: the time goes into
reading the weights, so fewer bytes per weight decode faster. "int8" stores each weight row o as
8-bit integers and one scale, symmetric absmax like NF4's blocks (lit_lora/nf4.py,
section 2) but one block per row:

    scale[o] = max_i |W[o, i]| / 127        W[o, i] ~ scale[o] * q[o, i],   q in [-127, 127]
    h[o] = sum_i W[o, i] x[i] ~ scale[o] * sum_i q[o, i] x[i]      (the scale leaves the dot product)

A quarter of float32's bytes, half of bf16's, and a rounding error of at most scale / 2 per weight.
Unlike NF4 it is meant for inference (`generate/*.py --quantize int8`); it quantizes the output head
too: 39 % of the weights a 60M model with a 32k vocabulary reads per token. Three ways to multiply, the
first that applies:
  - up to 16 rows on a CPU (decoding), float32 or bf16: `int8_rows` of lit_lora/speed/row_kernels.py, a
    small C++ kernel compiled on first use. It rounds each activation row to 16-bit integers with
    a scale of its own (an error 258x below the weights' rounding) and multiplies in integers, two
    products per instruction, so two cores keep up with the memory;
  - more rows in bf16 on a CPU (prompts): PyTorch's fused int8 x bf16 kernel;
  - elsewhere the layer dequantizes (`DequantizedMatmul`): it is only smaller, not faster.

Replaces: `F.linear(x, W)` with a bf16 or float32 W. Why it is faster: decoding streams every weight
once per token, and int8 halves bf16's bytes; the kernels multiply without materialising W.
Loaded with `generate/*.py --quantize int8` (lit_lora/speed/quantize.py builds the layers).
"""

from typing import Optional, Union

import torch
import torch.nn as nn

from lit_lora.nf4 import DequantizedMatmul
from lit_lora.speed.row_kernels import K_STEP, MAX_ROWS, row_kernels


class Int8Linear(nn.Module):
    """A frozen bias-free linear layer with int8 weights, one scale per output row:
    h = scale * (x q^T), with W ~ scale[:, None] * q.

    Buffers: `weight_int8` int8 (out, in) and `scale` (out,) in the compute dtype; `Module.to(dtype)`
    casts the scale and leaves the integers alone. Like `Linear4bit`, there is no `weight` attribute.
    """

    mode = "int8"

    def __init__(self, in_features: int, out_features: int, compute_dtype: torch.dtype = torch.float32,
                 device: Optional[Union[str, torch.device]] = None) -> None:
        """An empty layer (`load_weight` fills it); use `Int8Linear.from_weight` to quantize a matrix."""
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_int8", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.empty(out_features, dtype=compute_dtype, device=device))
        self.rows_kernel = None  # `row_kernels().int8_rows` once weights are loaded on a CPU (looked up then, not while compiling)

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.scale.dtype

    @classmethod
    def from_weight(cls, weight: torch.Tensor) -> "Int8Linear":
        """Quantize a float (out, in) matrix, as `Linear4bit.from_weight` (a meta `weight`: a shell)."""
        out_features, in_features = weight.shape
        layer = cls(in_features, out_features, compute_dtype=weight.dtype, device=weight.device)
        if weight.device.type != "meta":
            layer.load_weight(weight)
        return layer

    @torch.no_grad()
    def load_weight(self, weight: torch.Tensor) -> None:
        """Quantize `weight` (out, in) into this layer's buffers: absmax / 127 per row, round to nearest."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight of shape {tuple(weight.shape)} does not fit an Int8Linear "
                             f"({self.out_features}, {self.in_features})")
        weight = weight.to(self.weight_int8.device, torch.float32)
        if not torch.isfinite(weight).all():
            raise ValueError("cannot quantize a weight holding NaN or infinite values")
        scale = weight.abs().amax(dim=1) / 127  # (out,)
        scale = scale.to(self.scale.dtype).float()  # quantize against the scale the layer will multiply by
        self.weight_int8.copy_((weight / scale.clamp(min=torch.finfo(torch.float32).tiny)[:, None]).round().clamp(-127, 127))
        self.scale.copy_(scale)
        kernel_fits = self.weight_int8.device.type == "cpu" and self.in_features % K_STEP == 0
        self.rows_kernel = row_kernels().int8_rows if kernel_fits else None

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """W as a dense (out, in) tensor in `dtype` (default the compute dtype)."""
        return (self.weight_int8.float() * self.scale.float()[:, None]).to(dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)  # (N, in)
        if self.rows_kernel is not None and self._rows_kernel_applies(x):
            return self.rows_kernel(rows, self.weight_int8, self.scale).view(*x.shape[:-1], self.out_features)
        if self._fused_kernel_applies(x):
            h = torch._weight_int8pack_mm(rows.contiguous(), self.weight_int8, self.scale)  # (N, out); unit stride
            return h.view(*x.shape[:-1], self.out_features)
        return DequantizedMatmul.apply(x, self)  # (..., in) -> (..., out)

    def _rows_kernel_applies(self, x: torch.Tensor) -> bool:
        """`int8_rows` (lit_lora/speed/row_kernels.cpp): up to `MAX_ROWS` rows on a CPU in the compute dtype
        (float32 or bf16), no gradient."""
        return (x.device.type == "cpu" and x.dtype == self.scale.dtype and x.dtype in (torch.float32, torch.bfloat16)
                and x.numel() <= MAX_ROWS * self.in_features and not (x.requires_grad and torch.is_grad_enabled()))

    def _fused_kernel_applies(self, x: torch.Tensor) -> bool:
        """PyTorch's CPU kernel for bf16 activations x int8 weights (the one gpt-fast and torchao use):
        a private op without autograd. In torch 2.13 its bf16 results are right when in_features is a
        multiple of 16, wrong for 8 or 24, and it crashes on 33 or 100; we ask for a multiple of 32, which
        every Llama size meets (tests/test_quantize.py checks the shapes allowed and refused)."""
        return (x.device.type == "cpu" and x.dtype == torch.bfloat16 and self.scale.dtype == torch.bfloat16
                and self.in_features % 32 == 0 and not (x.requires_grad and torch.is_grad_enabled())
                and hasattr(torch, "_weight_int8pack_mm"))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}, compute_dtype={self.compute_dtype}"
