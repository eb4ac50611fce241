"""Llama 2 in one file, written to be read top to bottom; Llama 3.x and SmolLM2 are the same model.

Llama 2 (Touvron et al. 2023) is a decoder-only transformer: token embeddings, a stack of pre-norm blocks,
a final norm and a linear head that scores the next token. Llama 3.x and SmolLM2 differ only by `Config`
values (`rope_theta`, `rope_scaling`: see `rope_frequencies`) and by their tokenizers (lit_lora/tokenizer.py).

    idx ─► tok_embeddings ─► [ Block ] x n_layer ─► RMSNorm ─► lm_head ─► logits

    Block:  x ─► RMSNorm ─► CausalSelfAttention (RoPE, GQA) ─► (+x) ─► RMSNorm ─► SwiGLU MLP ─► (+)

Notation used in the shape comments:
    B   batch size                      T   sequence length of this forward pass
    C   embedding size (n_embd)         V   vocabulary size
    nh  number of query heads           hs  head size (C // nh)
    nkv number of key/value heads       S   length of the keys/values attended to (T, or the
                                            filled part of the KV cache when decoding)

Fine-tuning methods plug into this model without changing this file: LoRA (lit_lora/lora.py, `add_lora`
swaps chosen `nn.Linear` projections for `LoRALinear` wrappers on a built model) and LLaMA-Adapter
(lit_lora/adapter.py, `add_adapter` fills the `adapter` seam of `CausalSelfAttention` in the top layers).
"""

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint


@dataclass
class Config:
    """Architecture hyperparameters: what a Hugging Face `LlamaConfig` sets for Llama 2, Llama 3.x and SmolLM2."""

    name: str = ""
    block_size: int = 4096  # context length: the longest sequence the model is used with
    vocab_size: int = 32000
    n_layer: int = 32
    n_head: int = 32
    n_embd: int = 4096
    n_kv_heads: Optional[int] = None  # < n_head means grouped-query attention; None means n_head
    intermediate_size: Optional[int] = None  # SwiGLU hidden size; None derives Meta's default
    rope_theta: float = 10000.0  # RoPE's base: Llama 2 10000, SmolLM2 100000, Llama 3 500000 (longer wavelengths)
    rope_scaling: Optional[Dict[str, Any]] = None  # Hugging Face's dict: {"rope_type": "linear" | "llama3", ...}
    norm_eps: float = 1e-5
    tie_embeddings: bool = False  # lm_head shares the embedding matrix (small models do this)

    def __post_init__(self) -> None:
        for field in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "n_kv_heads", "intermediate_size"):
            value = getattr(self, field)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"Config.{field} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_head
        if self.n_head % self.n_kv_heads:
            raise ValueError(f"n_head ({self.n_head}) must be divisible by n_kv_heads ({self.n_kv_heads})")
        kind = (self.rope_scaling or {}).get("rope_type")
        if self.rope_scaling is not None and set(self.rope_scaling) != {"rope_type", *ROPE_SCALING_KEYS.get(kind, "?")}:
            raise ValueError(f"rope_scaling {self.rope_scaling}: expected a rope_type and its keys, {ROPE_SCALING_KEYS}")
        if self.intermediate_size is None:
            # Meta's rule: 2/3 of 4 * C (SwiGLU has three matrices instead of two), rounded up to 256.
            self.intermediate_size = 256 * math.ceil(int(2 * 4 * self.n_embd / 3) / 256)

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "Config":
        if name not in PRESETS:
            raise ValueError(f"unknown model name {name!r}; choose one of {sorted(PRESETS)}")
        return cls(name=name, **{**PRESETS[name], **overrides})

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "Config":
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown Config fields {unknown}")
        return cls(**values)


ROPE_SCALING_KEYS = {"linear": ("factor",),
                     "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
LLAMA3 = dict(block_size=131072, vocab_size=128256, n_kv_heads=8, rope_theta=500000.0, rope_scaling=dict(
    rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192))
SMOLLM2 = dict(tie_embeddings=True, block_size=8192, vocab_size=49152, rope_theta=100000.0)

PRESETS: Dict[str, Dict[str, Any]] = {
    # Llama 2 (Touvron et al. 2023, Table 1). 70B uses grouped-query attention with 8 key/value heads.
    "7B": dict(n_layer=32, n_head=32, n_embd=4096, intermediate_size=11008),
    "13B": dict(n_layer=40, n_head=40, n_embd=5120, intermediate_size=13824),
    "70B": dict(n_layer=80, n_head=64, n_embd=8192, n_kv_heads=8, intermediate_size=28672),
    # Small public Llama-2-architecture models for a laptop CPU (llama2.c's tie the head to the embedding).
    "TinyLlama-1.1B": dict(block_size=2048, n_layer=22, n_head=32, n_embd=2048, n_kv_heads=4, intermediate_size=5632),
    "stories15M": dict(tie_embeddings=True, block_size=256, n_layer=6, n_head=6, n_embd=288, intermediate_size=768),
    "stories42M": dict(tie_embeddings=True, block_size=1024, n_layer=8, n_head=8, n_embd=512, intermediate_size=1376),
    "stories110M": dict(tie_embeddings=True, block_size=1024, n_layer=12, n_head=12, n_embd=768, intermediate_size=2048),
    # Llama 3.1/3.2 (Meta 2024, 128,256 tokens, 131,072 positions) and SmolLM2 (Hugging Face 2024, deep and narrow).
    "Llama-3.2-1B": dict(LLAMA3, tie_embeddings=True, n_layer=16, n_head=32, n_embd=2048, intermediate_size=8192),
    "Llama-3.2-3B": dict(LLAMA3, tie_embeddings=True, n_layer=28, n_head=24, n_embd=3072, intermediate_size=8192),
    "Llama-3.1-8B": dict(LLAMA3, rope_scaling={**LLAMA3["rope_scaling"], "factor": 8.0}, n_layer=32, n_head=32,
                         n_embd=4096, intermediate_size=14336),
    "SmolLM2-135M": dict(SMOLLM2, n_layer=30, n_head=9, n_embd=576, n_kv_heads=3, intermediate_size=1536),
    "SmolLM2-360M": dict(SMOLLM2, n_layer=32, n_head=15, n_embd=960, n_kv_heads=5, intermediate_size=2560),
    "SmolLM2-1.7B": dict(SMOLLM2, rope_theta=130000.0, n_layer=24, n_head=32, n_embd=2048, intermediate_size=8192),
    # For tests and CPU experiments: ~4.5M parameters, mostly the Llama 2 sized embedding and head.
    "tiny": dict(block_size=512, n_layer=2, n_head=4, n_embd=64, n_kv_heads=2, intermediate_size=176),
}


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019): x / sqrt(mean(x^2) + eps) * weight. Unlike LayerNorm no mean
    is subtracted and no bias added: rescaling is what stabilises training. Statistics in float32 even for bf16."""

    def __init__(self, size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_fp32 = x.float()
        normed = x_fp32 * torch.rsqrt(x_fp32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def rope_frequencies(head_size: int, theta: float, scaling: Optional[Dict[str, Any]] = None,
                     device: Optional[torch.device] = None) -> torch.Tensor:
    """RoPE's frequencies f_i = theta^(-2i / hs), (hs/2,), lowered by `scaling` so that positions beyond the
    trained context map onto angles the model has seen. linear (Chen et al. 2023, position interpolation):
    every f_i / factor. llama3: pairs turning fewer than low_freq_factor times over the original context
    get f_i / factor, those turning more than high_freq_factor times (they tell neighbours apart) keep f_i,
    and the ones in between a linear blend of the two."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_size, 2, device=device, dtype=torch.float32) / head_size)
    if scaling is None:
        return inv_freq
    keep = torch.zeros_like(inv_freq)  # 1: f_i stays, 0: f_i / factor
    if scaling["rope_type"] == "llama3":
        turns = scaling["original_max_position_embeddings"] / (2 * math.pi / inv_freq)  # over the original context
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        keep = ((turns - low) / (high - low)).clamp(0, 1)
    return (1 - keep) * inv_freq / scaling["factor"] + keep * inv_freq


def rope_cos_sin(positions: torch.Tensor, head_size: int, theta: float, dtype: torch.dtype,
                 scaling: Optional[Dict[str, Any]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rotary position embedding tables (Su et al. 2021, "RoFormer", section 3.4) for `positions`.

    RoPE encodes position p by rotating each pair of query/key features by the angle p * f_i, with
    frequencies f_i (`rope_frequencies`). The dot product of a rotated query at position m and a
    rotated key at position n then depends only on m - n: attention sees relative positions.

    Layout: we pair feature i with feature i + hs/2 ("rotate half", the Hugging Face layout), so HF
    checkpoints and PEFT adapters load without any permutation. Meta's original checkpoints pair
    neighbours (2i, 2i+1); `lit_lora/files/convert.py` (`meta_to_rotate_half`) permutes their q/k rows once, exactly.

    Computed per forward pass (T x hs/2 sines, negligible next to the matmuls): no buffers to rebuild.

    positions: (T,), one position list for every row, or (B, T), each row its own (packed rows, left-padded
    prompts). Returns cos and sin of shape (1, T, hs) or (B, 1, T, hs): broadcastable against (B, n, T, hs).
    """
    inv_freq = rope_frequencies(head_size, theta, scaling, positions.device)
    angles = positions.float()[..., None] * inv_freq  # (..., T, hs/2)
    angles = torch.cat((angles, angles), dim=-1).unsqueeze(-3)  # (..., 1, T, hs): feature i and i + hs/2 share an angle
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (x_i, x_{i+hs/2}) by the angle of its position: x * cos + rotate_half(x) * sin."""
    half = x.size(-1) // 2
    rotated_half = torch.cat((-x[..., half:], x[..., :half]), dim=-1)  # (B, n, T, hs)
    return x * cos + rotated_half * sin


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """The formula `F.scaled_dot_product_attention` computes, spelled out (Vaswani et al. 2017):
    softmax(q k^T / sqrt(hs), masked where `mask` is False) v. q: (B, nh, T, hs); k, v: (B, nh, S, hs).
    The fused kernel gives the same result without materialising the (T, S) score matrix."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))  # (B, nh, T, S)
    if mask is None:  # plain causal: query t sees keys 0..t
        mask = torch.ones(q.size(-2), k.size(-2), dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(dim=-1) @ v  # (B, nh, T, hs)


class KVCache(nn.Module):
    """Keys and values of the tokens seen so far, preallocated for `max_seq_length` positions. Each new token's
    query attends to all earlier keys/values: caching them makes a decoding step O(T) instead of O(T^2)."""

    def __init__(self, batch_size: int, n_kv_heads: int, max_seq_length: int, head_size: int,
                 device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        shape = (batch_size, n_kv_heads, max_seq_length, head_size)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.adapter_kv: Optional[Tuple[torch.Tensor, torch.Tensor]] = None  # LLaMA-Adapter's prompt keys/values

    def update(self, input_pos: torch.Tensor, end: int, k: torch.Tensor, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, nkv, T, hs) at `input_pos`; return the filled prefix (B, nkv, end, hs)."""
        batch = k.size(0)
        self.k[:batch, :, input_pos] = k.to(self.k.dtype)
        self.v[:batch, :, input_pos] = v.to(self.v.dtype)
        return self.k[:batch, :, :end], self.v[:batch, :, :end]


class CausalSelfAttention(nn.Module):
    """Multi-head attention with rotary positions and grouped-query attention (GQA, Ainslie et al. 2023): nh
    query heads share nkv <= nh key/value heads, each serving nh // nkv consecutive query heads (nkv = nh: plain
    multi-head attention). Llama-2-70B's nkv = 8 for nh = 64 shrinks the KV cache 8x at almost no quality cost."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.n_head, self.n_kv_heads, self.head_size = config.n_head, config.n_kv_heads, config.head_size
        kv_size = config.n_kv_heads * config.head_size
        # LoRA enters here: add_lora() (lit_lora/lora.py) replaces q_proj and v_proj by default (any of
        # the four on request) with LoRALinear(W), computing W x + (alpha / r) B A x.
        self.q_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.k_proj = nn.Linear(config.n_embd, kv_size, bias=False)
        self.v_proj = nn.Linear(config.n_embd, kv_size, bias=False)
        self.o_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.kv_cache: Optional[KVCache] = None
        # The LLaMA-Adapter seam, None in plain Llama: add_adapter() (lit_lora/adapter.py) sets adapter(q, self) ->
        # (B, nh, T, hs), a gated attention over learned prompt tokens added to the attention output before o_proj.
        self.adapter: Optional[nn.Module] = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                input_pos: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, T, C = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_size).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_size).transpose(1, 2)  # (B, nkv, T, hs)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_size).transpose(1, 2)  # (B, nkv, T, hs)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        if input_pos is not None:  # incremental decoding: attend to everything cached so far
            k, v = self.kv_cache.update(input_pos, mask.size(-1), k, v)  # (B, nkv, S, hs)
        # GQA: query head h reads key/value head h // (nh // nkv). Decoding one token, the kernel does that indexing
        # itself (enable_gqa) instead of copying the whole KV cache in every layer for every token; elsewhere the
        # heads are expanded, which every fused kernel accepts (the GPU's memory-efficient one lacks enable_gqa).
        gqa = self.n_kv_heads != self.n_head
        if gqa and T > 1:
            k = k.repeat_interleave(self.n_head // self.n_kv_heads, dim=1)  # (B, nh, S, hs)
            v = v.repeat_interleave(self.n_head // self.n_kv_heads, dim=1)  # (B, nh, S, hs)

        # Same result as naive_attention(q, k, v, mask) above (heads expanded), in a fused kernel.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           enable_gqa=gqa and T == 1)  # (B, nh, T, hs)
        if self.adapter is not None:
            y = y + self.adapter(q, self)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C): heads side by side again
        return self.o_proj(y)


class MLP(nn.Module):
    """SwiGLU feed-forward (Shazeer 2020): down(silu(gate(x)) * up(x)). The gate decides, feature by feature, how
    much of the up projection passes; with three matrices, the hidden size is ~2/3 of 4 * C for the same count."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.n_embd, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.n_embd, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # (B, T, C)


class Block(nn.Module):
    """Pre-norm residual block: normalise the input of each sub-layer, never the residual stream."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.attn = CausalSelfAttention(config)
        self.mlp_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                input_pos: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, input_pos, mask)
        return x + self.mlp(self.mlp_norm(x))


class Llama(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.n_embd)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.n_embd, config.norm_eps)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_embeddings.weight
        # Training option: recompute each block's activations during backward from its input (~1/3 more compute
        # for activation memory that no longer grows with n_layer).
        self.activation_checkpointing = False
        if self.tok_embeddings.weight.device.type != "meta":  # meta-device models get their weights by loading
            self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        """GPT-2 style N(0, 0.02) for a model trained from scratch (the quickstart's tiny base)."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def set_kv_cache(self, batch_size: int, max_seq_length: Optional[int] = None,
                     device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None) -> None:
        """Preallocate a KV cache in every layer for incremental decoding with `forward(idx, input_pos)`."""
        max_seq_length = max_seq_length or self.config.block_size
        if max_seq_length > self.config.block_size:
            raise ValueError(f"max_seq_length {max_seq_length} exceeds the model's context length {self.config.block_size}")
        weight = self.tok_embeddings.weight  # never wrapped by LoRA or quantized
        for block in self.layers:
            block.attn.kv_cache = KVCache(batch_size, self.config.n_kv_heads, max_seq_length, self.config.head_size,
                                          device=device or weight.device, dtype=dtype or weight.dtype)

    def clear_kv_cache(self) -> None:
        for block in self.layers:
            block.attn.kv_cache = None

    def forward(self, idx: torch.Tensor, input_pos: Optional[torch.Tensor] = None, *,
                segment_ids: Optional[torch.Tensor] = None, left_pad: Optional[torch.Tensor] = None) -> torch.Tensor:
        """idx: (B, T) token ids -> logits (B, T, V).

        Without `input_pos`: the whole sequence under a causal mask (training, scoring). With `input_pos` (T
        increasing positions): keys/values go to the KV cache (`set_kv_cache`), each query sees the cache up to itself.

        segment_ids (B, T), training on packed rows (lit_lora/data.py, `PackedBatchSampler`): samples back to
            back, token t of sample s marked s. Each token attends only to the earlier tokens of its own sample
            and its rotary position counts from that sample's start: each is computed as if alone in its row.
        left_pad (B,), batched generation of prompts of different lengths (lit_lora/generate.py): row b
            starts with left_pad[b] padding positions, which no query attends to and which positions skip.
        """
        B, T = idx.shape
        if input_pos is None:
            if T > self.config.block_size:
                raise ValueError(f"sequence of length {T} exceeds the context length {self.config.block_size}")
            positions, mask = torch.arange(T, device=idx.device), None  # (T,); None: plain causal
            if segment_ids is not None:
                positions, mask = packed_positions_and_mask(segment_ids)  # (B, T), (B, 1, T, T)
        else:
            cache = self.layers[0].attn.kv_cache
            if cache is None:
                raise RuntimeError("forward with input_pos needs a KV cache: call model.set_kv_cache(batch_size) first")
            end = int(input_pos[-1]) + 1
            if end > cache.k.size(2) or B > cache.k.size(0):
                raise ValueError(f"position {end - 1} / batch {B} do not fit the KV cache of shape {tuple(cache.k.shape)}")
            positions, mask = cached_positions_and_mask(input_pos, end, left_pad)
        cos, sin = rope_cos_sin(positions, self.config.head_size, self.config.rope_theta, self.tok_embeddings.weight.dtype,
                                self.config.rope_scaling)

        x = self.tok_embeddings(idx)  # (B, T, C)
        for block in self.layers:
            if self.activation_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, input_pos, mask, use_reentrant=False)
            else:
                x = block(x, cos, sin, input_pos, mask)
        return self.lm_head(self.norm(x))  # (B, T, V)


def cached_positions_and_mask(input_pos: torch.Tensor, end: int,
                              left_pad: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rotary positions and attention mask of T new tokens at cache slots `input_pos` (T,) attending to the
    first `end` slots of the KV cache: (T,) and (T, S = end), or with `left_pad` (B,) (B, T) and (B, 1, T, S)."""
    keys = torch.arange(end, device=input_pos.device)
    mask = input_pos[:, None] >= keys[None, :]  # (T, S): causal over the cache
    if left_pad is None:
        return input_pos, mask
    positions = input_pos[None, :] - left_pad[:, None]  # (B, T): every prompt's first token is position 0
    not_padding = keys[None, :] >= left_pad[:, None]  # (B, S)
    itself = keys[None, :] == input_pos[:, None]  # (T, S): a padding query sees only itself (none: NaNs in the cache)
    return positions, mask & (not_padding[:, None, None, :] | itself)  # (B, 1, T, S)


def packed_positions_and_mask(segment_ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rotary positions and attention mask of packed rows: segment_ids (B, T) -> (B, T), (B, 1, T, T).

        segment_ids   0 0 0 1 1 2 2 2          mask (query row, key column):  block-diagonal and causal
        positions     0 1 2 0 1 0 1 2              1 . . . . . . .
                                                   1 1 . . . . . .
                                                   1 1 1 . . . . .
                                                   . . . 1 . . . .
                                                   . . . 1 1 . . .   ...

    The pitfall this avoids: "simple" packing into one causal sequence lets a sample attend to those before it
    in the row and numbers its positions from wherever it landed: the model learns from text never seen together.
    """
    T = segment_ids.size(1)
    index = torch.arange(T, device=segment_ids.device)
    starts = torch.ones_like(segment_ids, dtype=torch.bool)  # (B, T): True where a new sample begins
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    start_of_own_sample = torch.where(starts, index, 0).cummax(dim=1).values  # (B, T)
    same_sample = segment_ids[:, :, None] == segment_ids[:, None, :]  # (B, T, T)
    causal = index[:, None] >= index[None, :]  # (T, T)
    return index - start_of_own_sample, (same_sample & causal).unsqueeze(1)  # (B, T), (B, 1, T, T)
