"""Many adapters over one base model, in one batch: row b of a batch computes with its own adapter.

Why unmerged adapters make serving many of them cheap
-----------------------------------------------------
A merged LoRA adapter is a whole new model: W' = W + s B A in every adapted layer, so N adapters would
mean N copies of the base (13.5 GB each for Llama-2-7B). Kept apart, an adapter is only its factors,
r (in + out) numbers per adapted layer (16.8 MB for Llama-2-7B's q and v at r = 8): one copy of the base
and any number of adapters fit in memory together. In a batch whose rows use different adapters (row b
with adapter i_b) every adapted layer computes

    h_b = W x_b + s_i B_i A_i x_b          the base matmul is shared; each row adds its own update

    base:    x (B, T, in) @ W^T                        one matmul for all rows; W is read once per step
    update:  A_rows = A[ids] (B, r, in), B_rows = B[ids] (B, out, r)          gathered, one slice per row
             bmm(bmm(x, A_rows^T), B_rows^T)  (B, T, in) -> (B, T, r) -> (B, T, out)

What the gathered per-row product costs. The base part is the same as without adapters. The update part
is r (in + out) multiply-adds per row and token, and, unlike W, each row reads its own A and B (no
sharing, even between rows of one adapter): for a square C x C layer that is 2 r / C of the base's
work per row, 0.4 % for Llama-2-7B at r = 8, and at 16 rows about 6 % of the bytes the base matmul
reads while decoding (where reading weights is what bounds the speed). The gather (copying each row's
A and B into A_rows and B_rows) happens when the batch's rows change, not at every step. Punica and
S-LoRA do the gather inside one custom kernel (BGMV) without the copy; plain `torch.bmm` is enough here.
Adapters of different ranks are padded with zeros to the largest: zero rows of A add exact zeros.

DoRA rows (lit_lora/dora.py): h = (m / ||V||) (W x + s B A x), with V = W + s B A. While serving
nothing trains, so the per-feature factor m / ||V|| (out,) of each adapter is a constant, computed once
at load; a row then adds (m / ||V|| - 1) W x to the shared base output, with the same formula as
`dora_output`, and a plain LoRA row has factor 1 (it adds an exact zero).

LLaMA-Adapter rows (lit_lora/adapter.py) mix too: a row adds its adapter's gated attention over that
adapter's prompt keys and values (computed once at load with the base's k_proj and v_proj, as
`AdaptionPrompt` computes them once per KV cache). Inside each adapted layer the rows are grouped by
adapter, one small attention per adapter present; rows of other adapters add nothing.

Routing: `RowAdapters.use(ids)` tells every layer which adapter each row of the next forward passes
uses (id 0: the base alone). When all rows use one adapter, each layer computes exactly as
`LoRALinear` and `AdaptionPrompt` do for that adapter alone.
"""

from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from lit_lora.adapter import remove_adapter
from lit_lora.dora import row_norms
from lit_lora.lora import compute_device_dtype, dense_weight, lora_layers, remove_lora
from lit_lora.methods import apply_weights
from lit_lora.model import CausalSelfAttention, Llama


class RowLoRALinear(nn.Module):
    """A frozen linear layer plus the LoRA (or DoRA) updates of several adapters, one chosen per row."""

    def __init__(self, base: nn.Module, updates: Mapping[int, Tuple[torch.Tensor, torch.Tensor, float, Optional[torch.Tensor]]],
                 n_adapters: int) -> None:
        """updates: {adapter id: (A (r, in), B (out, r), scaling, DoRA's m / ||V|| (out,) or None)}."""
        super().__init__()
        self.base = base
        self.updates = dict(updates)
        device, dtype = compute_device_dtype(base)
        rank = max(a.size(0) for a, _, _, _ in updates.values())
        stack = lambda *shape: torch.zeros(n_adapters + 1, *shape, device=device, dtype=dtype)  # id 0: the base
        self.register_buffer("A", stack(rank, base.in_features), persistent=False)  # (N + 1, r, in)
        self.register_buffer("B", stack(base.out_features, rank), persistent=False)  # (N + 1, out, r)
        self.register_buffer("factor", stack(base.out_features) + 1, persistent=False)  # m / ||V||, 1 without DoRA
        self.register_buffer("coefficient", stack(base.out_features), persistent=False)  # factor * scaling
        for i, (a, b, scaling, factor) in updates.items():
            self.A[i, : a.size(0)], self.B[i, :, : a.size(0)] = a, b
            if factor is not None:
                self.factor[i] = factor
            self.coefficient[i] = self.factor[i] * scaling
        self.has_dora = any(factor is not None for _, _, _, factor in updates.values())
        self.use([0])

    def use(self, ids: Sequence[int]) -> None:
        """Route the rows of the next forward passes: row b uses adapter ids[b]."""
        self.single = ids[0] if len(set(ids)) == 1 else None
        if self.single is None:
            index = torch.tensor(ids, device=self.A.device)
            self.A_rows, self.B_rows = self.A[index], self.B[index]  # (B, r, in), (B, out, r): gathered once
            self.factor_rows, self.coefficient_rows = self.factor[index, None], self.coefficient[index, None]  # (B, 1, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base(x)  # (B, T, out): the shared base matmul
        if self.single is not None:  # every row uses one adapter: LoRALinear's and dora_output's formulas
            if self.single not in self.updates:
                return h
            a, b, scaling, factor = self.updates[self.single]
            update = (x @ a.T) @ b.T  # (B, T, in) -> (B, T, r) -> (B, T, out)
            return h + scaling * update if factor is None else h + (factor - 1) * h + factor * scaling * update
        update = torch.bmm(torch.bmm(x, self.A_rows.transpose(1, 2)), self.B_rows.transpose(1, 2))  # (B, T, out)
        if self.has_dora:
            h = h + (self.factor_rows - 1) * h  # DoRA rows rescale the base output; LoRA rows add 0
        return h + self.coefficient_rows * update


class RowPrompts(nn.Module):
    """The LLaMA-Adapter seam of one layer for several adapters: each row attends to its adapter's prompt."""

    def __init__(self, prompts: Mapping[int, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
        """prompts: {adapter id: (gate (1,), prompt keys (1, nh, L, hs), prompt values (1, nh, L, hs))}."""
        super().__init__()
        self.prompts = dict(prompts)
        self.ids: List[int] = [0]

    def forward(self, q: torch.Tensor, attn: CausalSelfAttention) -> torch.Tensor:
        """q: the layer's rotated queries (B, nh, T, hs) -> each row's gated prompt attention (B, nh, T, hs)."""
        B = q.size(0)
        if len(set(self.ids)) == 1:  # one adapter for all rows: AdaptionPrompt.forward's formula
            gate, kp, vp = self.prompts[self.ids[0]]
            return gate * F.scaled_dot_product_attention(q, kp.expand(B, -1, -1, -1), vp.expand(B, -1, -1, -1))
        out = torch.zeros_like(q)
        for adapter in set(self.ids) & set(self.prompts):
            rows = torch.tensor([b for b, i in enumerate(self.ids) if i == adapter], device=q.device)
            gate, kp, vp = self.prompts[adapter]
            n = len(rows)
            out[rows] = gate * F.scaled_dot_product_attention(q[rows], kp.expand(n, -1, -1, -1), vp.expand(n, -1, -1, -1))
        return out


class RowAdapters:
    """Adapter files loaded side by side onto one base model, chosen per row with `use(ids)`.

    `names[i - 1]` is the name of adapter id i; id 0 is the base model alone. Every file is read with
    `methods.apply_weights` (its settings, shapes and base model checked), its tensors taken, and
    taken off again; the model's adapted layers are then replaced by `RowLoRALinear` and its adapter
    seams filled with `RowPrompts` on demand.
    """

    def __init__(self, model: Llama, files: Mapping[str, Path]) -> None:
        self.model, self.names, self.methods = model, list(files), {}
        self.routing: Optional[List[int]] = None  # the ids of the last use()
        lora: Dict[str, Dict[int, tuple]] = {}
        prompts: Dict[int, Dict[int, tuple]] = {}
        for adapter, (name, path) in enumerate(files.items(), start=1):
            weights = apply_weights(model, path)
            self.methods[name] = "dora" if getattr(weights.config, "use_dora", False) else weights.method.name
            if weights.method.name == "lora":
                for module, layer in lora_layers(model).items():
                    factor = None
                    if layer.lora_magnitude is not None:  # DoRA: the constant m / ||V|| as dora_output computes it
                        direction = dense_weight(layer.base).float() + layer.scaling * (layer.lora_B.float() @ layer.lora_A.float())
                        factor = (layer.lora_magnitude.float() / row_norms(direction)).to(layer.lora_A.dtype)
                    lora.setdefault(module, {})[adapter] = (layer.lora_A.detach(), layer.lora_B.detach(), layer.scaling, factor)
                remove_lora(model)
            else:  # LLaMA-Adapter: its prompt keys and values through the base's own projections
                with torch.no_grad():
                    for index, block in enumerate(model.layers):
                        if block.attn.adapter is not None:
                            kp, vp = block.attn.adapter.prompt_keys_values(block.attn)
                            prompts.setdefault(index, {})[adapter] = (block.attn.adapter.gate.detach(), kp, vp)
                remove_adapter(model)
        for module, updates in lora.items():
            model.set_submodule(module, RowLoRALinear(model.get_submodule(module), updates, len(files)))
        self.row_layers = [m for m in model.modules() if isinstance(m, RowLoRALinear)]
        self.row_prompts = {index: RowPrompts(layer_prompts) for index, layer_prompts in prompts.items()}

    def method(self, adapter: int) -> str:
        """'base', 'lora', 'dora' or 'adapter' for an adapter id."""
        return "base" if adapter == 0 else self.methods[self.names[adapter - 1]]

    def use(self, ids: Sequence[int]) -> None:
        """Route the rows of the next forward passes: row b uses adapter ids[b] (0: the base alone). The
        routing of the previous call is kept as it is (a decoding loop routes before every step; the rows
        are gathered again only when the batch changes)."""
        ids = list(ids)
        if ids == self.routing:
            return
        self.routing = ids
        for layer in self.row_layers:
            layer.use(ids)
        for index, seam in self.row_prompts.items():  # a layer no row adapts computes as plain Llama
            seam.ids = ids
            self.model.layers[index].attn.adapter = seam if set(ids) & set(seam.prompts) else None
