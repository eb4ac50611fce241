"""LLaMA-Adapter (Zhang et al. 2023, "LLaMA-Adapter: Efficient Fine-tuning of Language Models with
Zero-init Attention"), written from scratch against the `adapter` seam of `CausalSelfAttention`.

The idea
--------
Instead of changing any pretrained weight, give each of the top layers a few learnable "adaption
prompt" vectors P_l (L = prompt_length tokens of size C). The layer's own k_proj/v_proj turn them into L extra keys and
values, and every query of the sequence attends to them *in a separate softmax*, scaled by a learnable
gate g_l that starts at exactly zero:

                          x (B, T, C)  ─► q_proj ─► RoPE ─► q (B, nh, T, hs)
                                                             │
    sequence:  k, v = RoPE(k_proj(x)), v_proj(x)   ─────────►├─► causal softmax(q kᵀ / √hs) v ────┐
                                                             │                                   (+) ─► o_proj
    prompt:    kp, vp = k_proj(P_l), v_proj(P_l)   ─────────►└─► g_l · softmax(q kpᵀ / √hs) vp ───┘
               P_l (L, C), learned; no RoPE          every query sees all L prompt tokens (no mask)

Everything left of the (+) except P_l and g_l is the frozen pretrained layer; `CausalSelfAttention`
computes the top branch and calls `adapter(q, attn)` for the bottom one (`AdaptionPrompt.forward`).

Why a zero gate and a separate softmax (paper, section 3.2 "Zero-initialized Attention")
----------------------------------------------------------------------------------------
Randomly initialised prompts are noise. If they simply joined the keys of the ordinary attention,
they would take attention mass away from the real tokens from the first step on and disturb the
pretrained model exactly when finetuning is most fragile. LLaMA-Adapter therefore
  * softmaxes the prompt scores on their own, so the attention over the real tokens still sums to 1
    and is not renormalised by the prompts, and
  * multiplies the prompt branch by a gate g_l initialised to 0, so at step 0 the adapted model *is*
    the pretrained model (bit for bit: y + 0 · z = y), and training opens the gate only as far as
    the new instruction knowledge helps.
This is the same trick as LoRA's B = 0: start at the pretrained function, learn a residual. Like LoRA's
A, the prompts must *not* start at zero: with P = 0 and g = 0 the gate's gradient (proportional to the
prompt branch's output) and the prompt's gradient (proportional to g) would both be zero forever.
We initialise P ~ N(0, 1) like the official code (an nn.Embedding) and PEFT: the inputs of attention
are RMS-normalised, so unit-variance prompts look like the hidden states the projections were trained
on, and the zero gate already guarantees the exact start.

As in PEFT (our reference), each adapted layer has one scalar gate, used as is (no tanh). The prompt
keys carry no rotary embedding (the prompt sits at no position), while the queries are the rotated
ones the layer already computed, so a prompt token's score still varies with the query's position;
the official code and PEFT do the same, and we match them.

Parameter counts
----------------
Per adapted layer L · C prompt values + 1 gate. With L = 10 prompt tokens in the layers from
`start_layer` = 2 up (the paper's setting for 7B: the top 30 layers):

    Llama 2 7B    30 layers x (10 x 4096 + 1) = 1,228,830   (0.018 % of 6.74 B)
    Llama 2 13B   38 layers x (10 x 5120 + 1) = 1,945,638
    Llama 2 70B   78 layers x (10 x 8192 + 1) = 6,389,838

Grouped-query attention needs nothing special: k_proj/v_proj map the prompt to nkv heads, and each
key/value head is repeated for its group of nh // nkv query heads, exactly as for the real tokens.

Usage (explicit and reversible, like lit_lora.lora):

    config = AdapterConfig(prompt_length=10, start_layer=2)
    names = add_adapter(model, config)            # ["layers.2.attn", ..., "layers.31.attn"] for 7B
    mark_only_adapter_as_trainable(model)
    ...train...
    adapter_state_dict(model)                     # prompts and gates only (lit_lora/methods.py saves them)
    remove_adapter(model)                         # back to the plain model
"""

from dataclasses import asdict, dataclass
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from lit_lora.files.checkpoint import CheckpointError, check_keys_and_shapes  # a loaded adapter is checked key by key
from lit_lora.files.utils import count_parameters  # the lesson counts what trains
from lit_lora.model import CausalSelfAttention, Config, Llama


@dataclass
class AdapterConfig:
    """prompt_length: learned prompt tokens per adapted layer (the paper's K = 10).
    start_layer: index of the first adapted layer; every layer from it to the top gets a prompt."""

    prompt_length: int = 10
    start_layer: int = 2

    def __post_init__(self) -> None:
        if not isinstance(self.prompt_length, int) or self.prompt_length < 1:
            raise ValueError(f"prompt_length must be a positive integer, got {self.prompt_length!r}")
        if not isinstance(self.start_layer, int) or self.start_layer < 0:
            raise ValueError(f"start_layer must be a non-negative integer, got {self.start_layer!r}")

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


class AdaptionPrompt(nn.Module):
    """The prompt branch of one layer: g · softmax(q kpᵀ / √hs) vp, with kp, vp the layer's own
    projections of the learned prompt P. Called by `CausalSelfAttention` as `adapter(q, attn)`.

    Reusing the prompt's keys and values while decoding: P and the projections do not change while the
    model generates, so re-projecting P for every token (2 · L · C · nkv·hs multiply-adds per layer, more
    than all four attention projections of the one new token when L = 10) is wasted work. They are
    therefore computed once per KV cache and kept in it (`KVCache.adapter_kv`): the first forward pass
    after `model.set_kv_cache(...)` stores them, and they go with the cache (`model.clear_kv_cache()`,
    which `generate` calls when it returns). Without a KV cache (training, scoring) they are computed in
    every call, so gradients flow. A change of the weights while a KV cache is set (a LoRA merge between
    two decoding steps) is not seen: set the cache again after such a change.
    """

    def __init__(self, prompt_length: int, n_embd: int, device: Optional[torch.device] = None,
                 dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        self.prompt = nn.Parameter(torch.empty(prompt_length, n_embd, device=device, dtype=dtype))  # (L, C)
        nn.init.normal_(self.prompt, mean=0.0, std=1.0)  # like the official code and PEFT; see the module doc
        self.gate = nn.Parameter(torch.zeros(1, device=device, dtype=dtype))  # zero-init: starts as the base model

    def extra_repr(self) -> str:
        return f"prompt_length={self.prompt.size(0)}, n_embd={self.prompt.size(1)}"

    def prompt_keys_values(self, attn: CausalSelfAttention) -> Tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the prompt tokens for every query head: two (1, nh, L, hs) tensors."""
        cache = attn.kv_cache
        if cache is not None and cache.adapter_kv is not None:
            return cache.adapter_kv  # computed earlier in this KV cache's lifetime
        L = self.prompt.size(0)
        kp = attn.k_proj(self.prompt).view(1, L, attn.n_kv_heads, attn.head_size).transpose(1, 2)  # (1, nkv, L, hs)
        vp = attn.v_proj(self.prompt).view(1, L, attn.n_kv_heads, attn.head_size).transpose(1, 2)  # (1, nkv, L, hs)
        if attn.n_kv_heads != attn.n_head:  # GQA: each key/value head serves nh // nkv query heads
            kp = kp.repeat_interleave(attn.n_head // attn.n_kv_heads, dim=1)  # (1, nh, L, hs)
            vp = vp.repeat_interleave(attn.n_head // attn.n_kv_heads, dim=1)  # (1, nh, L, hs)
        if cache is not None:
            cache.adapter_kv = (kp, vp)
        return kp, vp

    def forward(self, q: torch.Tensor, attn: CausalSelfAttention) -> torch.Tensor:
        """q: the layer's rotated queries (B, nh, T, hs) -> the gated prompt attention (B, nh, T, hs).

        Naively: scores = q @ kp.transpose(-2, -1) / sqrt(hs)  (B, nh, T, L), no mask;
                 gate * scores.softmax(dim=-1) @ vp.
        `F.scaled_dot_product_attention` without a mask computes the same softmax(...) @ vp fused.
        """
        B = q.size(0)
        kp, vp = self.prompt_keys_values(attn)  # (1, nh, L, hs) each
        kp, vp = kp.expand(B, -1, -1, -1), vp.expand(B, -1, -1, -1)  # (B, nh, L, hs): a view, no copy
        return self.gate * F.scaled_dot_product_attention(q, kp, vp)  # (B, nh, T, hs)


def _adapted_layers(model: Llama) -> Iterator[Tuple[str, AdaptionPrompt]]:
    """(attention module name, its AdaptionPrompt) for every layer that has one."""
    for i, block in enumerate(model.layers):
        if block.attn.adapter is not None:
            yield f"layers.{i}.attn", block.attn.adapter


def adapter_state_shapes(adapter_config: AdapterConfig, model_config: Config) -> Dict[str, torch.Size]:
    """Names and shapes of the tensors an adapter with these settings has on this base model."""
    shapes = {}
    for i in range(adapter_config.start_layer, model_config.n_layer):
        shapes[f"layers.{i}.attn.adapter.prompt"] = torch.Size((adapter_config.prompt_length, model_config.n_embd))
        shapes[f"layers.{i}.attn.adapter.gate"] = torch.Size((1,))
    return shapes


def add_adapter(model: Llama, config: AdapterConfig) -> List[str]:
    """Fill the `adapter` seam of every layer from `config.start_layer` up with a fresh, zero-gated
    `AdaptionPrompt` (on the model's device and dtype, also the meta device). Returns the names of the
    attention modules adapted; the seams were empty (None) before, which `remove_adapter` restores."""
    n_layer = model.config.n_layer
    if config.start_layer >= n_layer:
        raise ValueError(f"start_layer {config.start_layer} leaves no layer to adapt: the model has {n_layer} layers "
                         f"(0..{n_layer - 1})")
    already = [name for name, _ in _adapted_layers(model)]
    if already:
        raise ValueError(f"the model already has adapters in {len(already)} layers ({already[0]}, ...): "
                         "call remove_adapter(model) first")
    weight = model.tok_embeddings.weight  # never wrapped by LoRA: a reliable source of device and dtype
    names = []
    for i in range(config.start_layer, n_layer):
        adapter = AdaptionPrompt(config.prompt_length, model.config.n_embd, device=weight.device, dtype=weight.dtype)
        model.layers[i].attn.adapter = adapter.train(model.training)  # an eval-mode model stays in eval mode
        names.append(f"layers.{i}.attn")
    return names


def remove_adapter(model: Llama) -> Dict[str, AdaptionPrompt]:
    """Empty every adapter seam; returns attention module name -> the removed `AdaptionPrompt`."""
    removed = dict(_adapted_layers(model))
    for name in removed:
        model.get_submodule(name).adapter = None
    return removed


def mark_only_adapter_as_trainable(model: Llama) -> Tuple[int, int]:
    """Freeze every parameter except the prompts and gates; returns (trainable, total) parameter counts."""
    adapters = [adapter for _, adapter in _adapted_layers(model)]
    if not adapters:
        raise ValueError("the model has no adapter to train: call add_adapter(model, AdapterConfig(...)) first")
    model.requires_grad_(False)
    for adapter in adapters:
        adapter.requires_grad_(True)
    return count_parameters(model)


def adapter_state_dict(model: Llama) -> Dict[str, torch.Tensor]:
    """Only the adapter's tensors, named as in `model.state_dict()` ('layers.2.attn.adapter.prompt', ...)."""
    return {f"{name}.adapter.{param_name}": param.detach()
            for name, adapter in _adapted_layers(model) for param_name, param in adapter.named_parameters()}


def load_adapter_state_dict(model: Llama, state: Mapping[str, torch.Tensor], source: str = "adapter state") -> None:
    """Load adapter tensors into the adapters already added to `model`: exactly the same names and
    shapes or a `CheckpointError` naming `source`. Values are converted to the model's dtype/device;
    adapters still on the meta device receive the tensors themselves (cheap loading)."""
    params = {f"{name}.adapter.{param_name}": param
              for name, adapter in _adapted_layers(model) for param_name, param in adapter.named_parameters()}
    if not params:
        raise CheckpointError(f"cannot load {source}: the model has no adapter; call add_adapter(model, config) first")
    check_keys_and_shapes({name: param.shape for name, param in params.items()}, state, source)
    for name, param in params.items():
        if param.is_meta:
            module_name, _, param_name = name.rpartition(".")
            replacement = nn.Parameter(state[name].to(param.dtype), requires_grad=param.requires_grad)
            setattr(model.get_submodule(module_name), param_name, replacement)
        else:
            with torch.no_grad():
                param.copy_(state[name])
