"""Quantizing whole models: the schemes, swapping a model's linear layers, loading a checkpoint straight
into quantized layers, merging LoRA into a quantized base, and measuring what it all stores.

    scheme   layer                      bits per weight     for
    nf4      Linear4bit (lit_lora/nf4)  4.5                 QLoRA: a frozen 4-bit base under LoRA
    nf4-dq   Linear4bit (lit_lora/nf4)  4.127               the same with double-quantized scales
    int8     Int8Linear (lit_lora/speed/int8) 8, plus a row scale fast decoding on CPUs

How NF4 works is taught in lit_lora/nf4.py; this file only applies a scheme to a model. A new scheme
is one `Scheme` entry in `SCHEMES` plus the file of its layer. Every quantized layer keeps one small
protocol, which lit_lora/lora.py relies on without importing anything from here:

    in_features, out_features    as in nn.Linear
    compute_dtype                the dtype it computes in; LoRA creates A and B in it
    dequantize(dtype=None)       the dense (out, in) weight
    load_weight(weight)          quantize `weight` into the layer's existing buffers
    from_weight(weight, ...)     a new layer holding `weight` (a meta `weight` gives an empty shell)
    no `weight` attribute        so no code writes into a temporary by mistake
"""

import sys
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Callable, Dict, Literal, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from lit_lora.files.checkpoint import load_checkpoint
from lit_lora.files.utils import PathLike, tied_parameters
from lit_lora.lora import lora_layers
from lit_lora.model import Llama
from lit_lora.nf4 import NF4_BLOCK_SIZE, NF4_MODES, SCALE_BLOCK_SIZE, Linear4bit
from lit_lora.speed.int8 import Int8Linear


@dataclass(frozen=True)
class Scheme:
    """One way of storing a frozen linear layer's weight."""

    name: str
    layer: type  # the nn.Module class holding the quantized weight
    from_weight: Callable[[torch.Tensor], nn.Module]  # (out, in) float weight -> that layer
    bits_per_parameter: float  # storage per weight in large matrices, scales included
    default_skip: Tuple[str, ...]  # module names kept in 16/32 bits unless told otherwise
    copies_tied_weight: bool  # a weight tied to the embedding gets a quantized copy (else: refused)


SCHEMES: Dict[str, Scheme] = {
    # QLoRA keeps the head in 16 bits: its errors would go straight into the logits.
    "nf4": Scheme("nf4", Linear4bit, lambda w: Linear4bit.from_weight(w, "nf4"),
                  4 + 32 / NF4_BLOCK_SIZE, ("lm_head",), False),
    "nf4-dq": Scheme("nf4-dq", Linear4bit, lambda w: Linear4bit.from_weight(w, "nf4-dq"),
                     4 + 8 / NF4_BLOCK_SIZE + 32 / (NF4_BLOCK_SIZE * SCALE_BLOCK_SIZE), ("lm_head",), False),
    # int8 decoding quantizes the head too: it is the largest matrix read per token (39 % of the weights a
    # 60M model with a 32k vocabulary reads). The embedding keeps the float matrix (a lookup reads one row).
    "int8": Scheme("int8", Int8Linear, Int8Linear.from_weight, 8.0, (), True),
}
QuantizeMode = Literal[tuple(SCHEMES)]  # the scripts' --quantize choices: every scheme's name
QLoRAMode = Literal[NF4_MODES]  # the schemes finetune/lora.py trains on
BACKENDS = ("torch", "bitsandbytes")


def get_scheme(mode: str) -> Scheme:
    if mode not in SCHEMES:
        raise ValueError(f"unknown quantization mode {mode!r}; choose one of {', '.join(SCHEMES)}")
    return SCHEMES[mode]


def bits_per_parameter(mode: str) -> float:
    """Storage per quantized weight, in bits, for large matrices (lit_lora/nf4.py, section 3)."""
    return get_scheme(mode).bits_per_parameter


def quantized_linear(weight: torch.Tensor, mode: str) -> nn.Module:
    """The frozen layer of scheme `mode` holding `weight` (out, in)."""
    return get_scheme(mode).from_weight(weight)


def _bitsandbytes_linear(weight: torch.Tensor, mode: str, device: Union[str, torch.device] = "cuda") -> nn.Module:
    """bitsandbytes' Linear4bit holding `weight` in the same NF4 format (64-weight blocks, double
    quantization for nf4-dq) on `device`. Imported here only: the library never needs bitsandbytes."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ValueError("backend 'bitsandbytes' needs the bitsandbytes package: pip install bitsandbytes") from None
    out_features, in_features = weight.shape
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=weight.dtype,
                              compress_statistics=mode == "nf4-dq", quant_type="nf4", device="meta")
    layer.weight = bnb.nn.Params4bit(weight.detach().cpu(), requires_grad=False, blocksize=NF4_BLOCK_SIZE,
                                     compress_statistics=mode == "nf4-dq", quant_type="nf4", module=layer)
    return layer.to(device)  # bitsandbytes quantizes when the weight moves to its device


def is_quantized_linear(module: nn.Module) -> bool:
    """A layer of one of the SCHEMES, or bitsandbytes' Linear4bit when bitsandbytes is already imported."""
    bnb = sys.modules.get("bitsandbytes")
    return (isinstance(module, tuple(scheme.layer for scheme in SCHEMES.values()))
            or (bnb is not None and isinstance(module, bnb.nn.Linear4bit)))


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """The dense (out, in) weight of a quantized linear layer, in its compute dtype."""
    if hasattr(module, "dequantize"):
        return module.dequantize()
    import bitsandbytes.functional as bnb_functional

    weight = bnb_functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
    return weight.to(module.compute_dtype or weight.dtype)


def quantize_model(model: nn.Module, mode: str = "nf4-dq", skip: Optional[Sequence[str]] = None,
                   backend: str = "torch") -> Dict[str, nn.Linear]:
    """Replace every `nn.Linear` of `model` by a layer of scheme `mode`, in place; returns {name: replaced
    nn.Linear}.

    skip: module names or glob patterns kept in 16/32 bits; default the scheme's (`lm_head` for NF4, as
    QLoRA does; nothing for int8). backend: "torch", the from-scratch layers, or "bitsandbytes" (CUDA,
    NF4 only). On a meta-device model the layers are empty shells with the right buffers, which
    `load_checkpoint_quantized` fills. A weight tied to another module (Llama's head and embedding in
    small models) is refused in 4 bits, which would store it twice; int8 gives the head its own copy.

    Drop the returned dict to free the 16-bit weights; `dequantize_model` goes back to nn.Linear.
    Linear layers wrapped by LoRA (`<name>.base`) are quantized too; LoRA's A and B never are.
    """
    scheme = get_scheme(mode)
    skip = scheme.default_skip if skip is None else tuple(skip)
    if backend not in BACKENDS:
        raise ValueError(f"unknown quantization backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "bitsandbytes" and not torch.cuda.is_available():
        raise ValueError("backend 'bitsandbytes' needs a CUDA GPU; use backend 'torch' (the default) elsewhere")
    if backend == "bitsandbytes" and scheme.layer is not Linear4bit:
        raise ValueError(f"mode {mode!r} has no bitsandbytes backend here; use backend 'torch'")
    tied = tied_parameters(model)
    linears = {name: m for name, m in model.named_modules() if type(m) is nn.Linear and name}
    chosen = {name: m for name, m in linears.items()
              if not any(fnmatchcase(name, p) or fnmatchcase(name, p + ".*") for p in skip)}
    for name, linear in chosen.items():
        if linear.bias is not None:
            raise ValueError(f"{name} has a bias; quantized layers here are bias-free (Llama has no biases): add it to skip")
        if id(linear.weight) in tied and not scheme.copies_tied_weight:
            raise ValueError(f"{name}.weight is tied to another module (e.g. the token embedding): "
                             "quantizing it would store it twice; add it to skip")
    replaced = {}
    for name, linear in chosen.items():
        if backend == "bitsandbytes":
            if linear.weight.device.type == "meta":
                raise ValueError("backend 'bitsandbytes' cannot quantize a meta-device model; load the weights first")
            quantized = _bitsandbytes_linear(linear.weight, mode)
        else:
            quantized = scheme.from_weight(linear.weight.detach())
        model.set_submodule(name, quantized)
        replaced[name] = linear
    return replaced


def dequantize_model(model: nn.Module) -> Dict[str, nn.Module]:
    """Replace every quantized layer by an nn.Linear holding its dequantized weight (compute dtype);
    returns {name: the quantized layer removed}. The inverse of `quantize_model` up to its rounding."""
    quantized = {name: m for name, m in model.named_modules() if is_quantized_linear(m)}
    for name, layer in quantized.items():
        model.set_submodule(name, _frozen_linear(dequantized_weight(layer)))
    return quantized


def _frozen_linear(weight: torch.Tensor) -> nn.Linear:
    """An nn.Linear holding `weight` itself (no copy, no random init), frozen."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=False)
    return linear


def load_checkpoint_quantized(checkpoint_dir: PathLike, mode: str = "nf4-dq", dtype: torch.dtype = torch.bfloat16,
                              device: Optional[Union[str, torch.device]] = None,
                              skip: Optional[Sequence[str]] = None) -> Llama:
    """Load a lit-lora checkpoint directly into a quantized model (`mode` and `skip` as in `quantize_model`).

    `load_checkpoint` builds the model on the meta device; its Linear layers are swapped for empty shells
    of the scheme's layer, allocated at once on `device` (default CPU) in their final, quantized size, and
    each projection weight is quantized into its layer as soon as it is read, one tensor at a time. Every
    other tensor (embedding, norms, skipped layers) is kept as `dtype`, also the layers' compute dtype.
    Peak memory is the quantized model plus about one 16-bit weight matrix and its quantization
    temporaries, never the 16-bit model. (Allocating the quantized layers first matters a little: buffers
    allocated one by one between the temporaries fragment the heap; on a 310 MB checkpoint the nf4-dq
    peak was 15-25 % higher.)
    """
    get_scheme(mode)
    with torch.no_grad():
        return load_checkpoint(checkpoint_dir, dtype=dtype, device=device,
                               prepare=lambda model: quantize_model(model, mode, skip))


@torch.no_grad()
def merge_lora_quantized(model: nn.Module, requantize: bool = False) -> Dict[str, nn.Module]:
    """Fold every LoRA update into its quantized base: W' = dequantize(W) + s B A (DoRA: m V / ||V||), in
    float32.

    Each LoRALinear over a quantized layer is replaced by a plain nn.Linear holding W' in the base's
    compute dtype (the function the adapted model computed, up to that rounding), or, with
    `requantize=True`, by a new quantized layer of W' (same mode and size, but the rounding now also falls on
    the learned update). Returns {name: the LoRALinear removed}; putting those back undoes it.
    """
    merged = {}
    for name, layer in lora_layers(model).items():
        if not is_quantized_linear(layer.base):
            continue
        weight = dequantized_weight(layer.base)
        weight = layer.merged_weight(weight).to(weight.dtype)  # W + s B A (DoRA: m V / ||V||), (out, in)
        if requantize:
            replacement = quantized_linear(weight, getattr(layer.base, "mode", "nf4-dq"))  # bitsandbytes': nf4-dq
        else:
            replacement = _frozen_linear(weight)
        model.set_submodule(name, replacement)
        merged[name] = layer
    if not merged:
        raise ValueError("the model has no LoRA layers over quantized weights to merge")
    return merged


def quantized_storage(model: nn.Module) -> Dict[str, int]:
    """Bytes of the model's tensors by role, measured from their sizes (works on the meta device):
    quantized codes (4-bit pairs, or int8), absmax (float32 in mode nf4; the per-row scales in int8),
    absmax codes and their scales/offsets (nf4-dq), all other parameters and buffers ("unquantized"),
    and "quantized_params": the weights the quantized layers hold."""
    roles = {"packed_weight": "codes", "absmax": "absmax", "absmax_codes": "absmax_codes",
             "absmax_scales": "absmax_scales", "absmax_offset": "absmax_scales",  # Linear4bit buffer -> role
             "weight_int8": "codes", "scale": "absmax"}  # Int8Linear
    storage = dict.fromkeys(("codes", "absmax", "absmax_codes", "absmax_scales", "unquantized"), 0)
    quantized_params, seen = 0, set()
    layer_types = tuple(scheme.layer for scheme in SCHEMES.values())
    for module in model.modules():
        is_quantized = isinstance(module, layer_types)
        if is_quantized:
            quantized_params += module.in_features * module.out_features
        for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if id(tensor) not in seen:  # a tied weight counts once
                seen.add(id(tensor))
                storage[roles[name] if is_quantized else "unquantized"] += tensor.numel() * tensor.element_size()
    return {**storage, "total": sum(storage.values()), "quantized_params": quantized_params}
