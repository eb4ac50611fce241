"""The one place that knows how Hugging Face names Llama's weights and configuration.

lit-lora uses Hugging Face's rotary layout (see `model.rope_cos_sin`), so converting between the two
formats is a renaming only: no tensor is permuted.
"""

import re
from typing import Any, Dict, Optional

from lit_lora.model import ROPE_SCALING_KEYS, Config


# lit-lora parameter name pattern -> Hugging Face parameter name pattern ({} is the layer index).
_LIT_TO_HF = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "layers.{}.attn_norm.weight": "model.layers.{}.input_layernorm.weight",
    "layers.{}.attn.q_proj.weight": "model.layers.{}.self_attn.q_proj.weight",
    "layers.{}.attn.k_proj.weight": "model.layers.{}.self_attn.k_proj.weight",
    "layers.{}.attn.v_proj.weight": "model.layers.{}.self_attn.v_proj.weight",
    "layers.{}.attn.o_proj.weight": "model.layers.{}.self_attn.o_proj.weight",
    "layers.{}.mlp_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "layers.{}.mlp.gate_proj.weight": "model.layers.{}.mlp.gate_proj.weight",
    "layers.{}.mlp.up_proj.weight": "model.layers.{}.mlp.up_proj.weight",
    "layers.{}.mlp.down_proj.weight": "model.layers.{}.mlp.down_proj.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}
_HF_TO_LIT = {hf: lit for lit, hf in _LIT_TO_HF.items()}
_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def _rename(name: str, table: Dict[str, str]) -> str:
    match = _LAYER_INDEX.search(name)
    pattern = _LAYER_INDEX.sub(".{}.", name, count=1) if match else name
    if pattern not in table:
        raise KeyError(name)
    return table[pattern].format(match.group(1)) if match else table[pattern]


def hf_to_lit_name(name: str) -> str:
    """'model.layers.3.self_attn.q_proj.weight' -> 'layers.3.attn.q_proj.weight'; KeyError if unknown."""
    return _rename(name, _HF_TO_LIT)


def lit_to_hf_name(name: str) -> str:
    """'layers.3.attn.q_proj.weight' -> 'model.layers.3.self_attn.q_proj.weight'; KeyError if unknown."""
    return _rename(name, _LIT_TO_HF)


def config_from_hf(hf: Dict[str, Any]) -> Config:
    """Build a `Config` from a Hugging Face `config.json` dictionary of a Llama-architecture model."""
    if hf.get("model_type", "llama") != "llama":
        raise ValueError(f"model_type {hf.get('model_type')!r} is not a Llama model")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ValueError("Llama variants with bias terms (attention_bias/mlp_bias) are not supported")
    # transformers >= 5 writes rope_theta and the scaling into one "rope_parameters" dict; older files have
    # "rope_theta" and "rope_scaling" (whose type key was once "type") side by side.
    rope = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    kind = rope.get("rope_type", rope.get("type", "default"))
    scaling = None
    if kind != "default":
        if kind not in ROPE_SCALING_KEYS:
            raise ValueError(f"RoPE scaling {kind!r} is not supported (only linear and llama3)")
        scaling = {"rope_type": kind, **{key: rope[key] for key in ROPE_SCALING_KEYS[kind]}}
    head_dim = hf.get("head_dim")
    if head_dim is not None and head_dim * hf["num_attention_heads"] != hf["hidden_size"]:
        raise ValueError(f"head_dim {head_dim} x num_attention_heads != hidden_size is not supported")
    return Config(
        name=hf.get("_name_or_path", "") or "",
        block_size=hf.get("max_position_embeddings", 4096),
        vocab_size=hf["vocab_size"],
        n_layer=hf["num_hidden_layers"],
        n_head=hf["num_attention_heads"],
        n_embd=hf["hidden_size"],
        n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        intermediate_size=hf["intermediate_size"],
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        rope_scaling=scaling,
        norm_eps=hf.get("rms_norm_eps", 1e-5),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )


def config_to_hf(config: Config, bos_id: Optional[int] = 1, eos_id: Optional[int] = 2) -> Dict[str, Any]:
    """The Hugging Face `config.json` dictionary describing the same architecture (and the tokenizer's
    bos/eos ids, which transformers' generation reads from it)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.n_embd,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_size,
        "max_position_embeddings": config.block_size,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": config.rope_scaling,
        "tie_word_embeddings": config.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
    }
