"""DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation"): LoRA that learns the size and
the direction of each weight row apart. `LoRALinear(..., use_dora=True)` (lit_lora/lora.py) calls these.

The idea (paper sections 2 and 3)
---------------------------------
Write every output row of a weight as a length times a direction: W = m * W / ||W||, with m = ||W||
per output feature. The paper compares how full finetuning and LoRA move these two parts across layers
and steps: full finetuning often changes the direction a lot while the length barely moves, or the
reverse (a negative correlation), whereas LoRA's updates change both together (a positive one). DoRA
gives the model both freedoms separately: a trainable magnitude vector m (one number per output
feature, initialised to ||W||) and a LoRA update of the direction only:

    V  = W + (alpha / r) B A               the direction, updated by LoRA as usual   (out, in)
    W' = m * V / ||V||                     row by row: ||.|| is the norm of each output row
    h  = W' x = (m / ||V||) * (W x + (alpha / r) B A x)

At initialisation B = 0, so V = W and m = ||W||: W' = W exactly, and the adapted model starts as the
pretrained one, as with LoRA. DoRA trains `out` more numbers per layer than LoRA (m): for Llama-2-7B's
q and v at r = 8, 4,456,448 instead of 4,194,304.

Why the norm is a constant in the backward pass (paper section 4.3)
-------------------------------------------------------------------
||V|| depends on B and A, so its gradient would flow back through a norm of the whole (out, in)
matrix: autograd would keep V for the backward pass, as large as W itself, in every adapted layer. The
paper treats ||V|| as a constant there (`detach`): the forward value still follows the update exactly,
only the gradient through the norm is dropped, which the paper finds costs no accuracy and saves the
memory. PEFT does the same; so do we, and the gradients of A, B and m equal PEFT's.

The extra cost: each forward pass forms V = W + (alpha / r) B A (a dense matrix, dequantized first on a
4-bit base) to take its row norms, O(out x in) work and memory per layer on top of LoRA's O(r (in + out)).

Merging: W' = m * V / ||V|| is an ordinary matrix, so a merged DoRA model is a plain Llama again.
"""

from typing import Tuple

import torch
import torch.nn as nn


def row_norms(weight: torch.Tensor) -> torch.Tensor:
    """||W|| per output feature: (out, in) -> (out,), the magnitude m starts at."""
    return torch.linalg.vector_norm(weight, dim=1)


def dora_output(x: torch.Tensor, base_out: torch.Tensor, base: nn.Module, weight: torch.Tensor, lora_A: torch.Tensor,
                lora_B: torch.Tensor, scaling: float, magnitude: torch.Tensor, dropout: nn.Module) -> torch.Tensor:
    """h = (m / ||V||) * (W x + scaling * B A x) for x (..., in), given base_out = base(x) = W x (..., out) and
    W = `weight`, the base's dense (dequantized) weight, used for the norm only.

    Written as base_out + (m / ||V|| - 1) * W x' + (m / ||V||) * scaling * B A x', with x' = dropout(x), so
    that without dropout it is exactly the formula above, and with dropout the frozen path still sees the
    full input (as in LoRA, and as PEFT computes it)."""
    dropped = dropout(x)
    with torch.no_grad():  # ||V||, a constant in backward (section 4.3): autograd keeps no (out, in) matrix
        norm = row_norms(weight.float() + scaling * (lora_B.float() @ lora_A.float()))  # (out,), in float32
    scale = (magnitude.float() / norm).to(x.dtype)  # (out,)
    # An inactive dropout (eval mode, or p = 0) returns x itself: then W x' is base_out, computed already.
    frozen = base_out if dropped is x else base(dropped)  # W x' through the base layer (a 4-bit one saves nothing)
    update = (dropped @ lora_A.T) @ lora_B.T  # (..., in) -> (..., r) -> (..., out)
    return base_out + (scale - 1) * frozen + scale * scaling * update


def dora_merged_weight(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(W' = m * V / ||V||, ||V||) for V = weight + delta, all in float32; ||V|| undoes the merge later."""
    direction = weight.float() + delta.float()  # V, (out, in)
    norm = row_norms(direction)  # (out,)
    return (magnitude.float() / norm)[:, None] * direction, norm
