"""LoRA adapters to and from Hugging Face PEFT's format.

A PEFT LoRA adapter for a Llama is a directory:

    adapter_config.json         {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": [...], ...}
    adapter_model.safetensors   base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight  (r, in)
                                base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight  (out, r)
                                ... and base_model.model.lm_head.lora_A.weight for the head

PEFT computes exactly what LoRALinear computes, h = W x + s B A x with dropout on the LoRA input
(s = lora_alpha / r, or / sqrt(r) with use_rslora; DoRA's magnitude is `lora_magnitude_vector`; per-layer
ranks and alphas are rank_pattern / alpha_pattern), so converting is a renaming: "base_model.model." +
the Hugging Face module name (from lit_lora.files.hf_names) + ".lora_A.weight". No tensor is transposed or permuted: A and B are stored as
(r, in) and (out, r) on both sides, and lit-lora's rotary layout is Hugging Face's (rotate-half, see
`model.rope_cos_sin`), so the q_proj/k_proj rows, and hence the rows of their B, mean the same thing.
"""

import re
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from lit_lora.files.checkpoint import (CheckpointError, check_keys_and_shapes, load_json, load_tensors, removed_on_failure,
                                       save_json, save_tensors)
from lit_lora.files.hf_names import hf_to_lit_name, lit_to_hf_name
from lit_lora.lora import LLAMA_TARGETS, LoRAConfig, lora_state_shapes
from lit_lora.model import Config


PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the transformers LlamaForCausalLM
# PEFT saves a full copy of lm_head beside an adapter that targets it (save_embedding_layers).
_HEAD_COPY = _PREFIX + "lm_head.base_layer.weight"

# PEFT options that change what a LoRA layer computes; an adapter using any of them cannot be
# represented by LoRALinear. (field, its "off" value where that is not empty/false/null, what it is)
_UNSUPPORTED_PEFT_OPTIONS = [
    ("bias", "none", "trained biases"),
    ("lora_bias", None, "a bias on lora_B"),
    ("modules_to_save", None, "fully trained extra modules"),
    ("layers_to_transform", None, "LoRA on a subset of the layers"),
    ("trainable_token_indices", None, "trained embedding rows"),
    ("layer_replication", None, "replicated layers"),
    ("alora_invocation_tokens", None, "activated LoRA (an adapter switched on by invocation tokens)"),
    ("use_qalora", None, "quantization-aware LoRA"),
    ("target_parameters", None, "LoRA on parameters rather than modules"),
    ("fan_in_fan_out", None, "transposed (Conv1D) weights"),
]
# init_lora_weights values whose adapters compute W x + s B A x on the original base. The others
# (pissa, olora, loftq, corda, eva, ...) change the base weights at init: the adapter only works on that
# modified base, which a PEFT adapter directory does not hold.
_EXACT_INITS = (True, False, "gaussian")


def _hf_module(lit_module: str) -> str:
    """'layers.0.attn.q_proj' -> 'model.layers.0.self_attn.q_proj' (hf_names maps parameter names)."""
    return lit_to_hf_name(lit_module + ".weight")[: -len(".weight")]


_PEFT_TENSORS = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight", "lora_magnitude": "lora_magnitude_vector"}


def lit_to_peft_key(name: str) -> str:
    """'layers.0.attn.q_proj.lora_A' -> 'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight'
    (DoRA's 'lora_magnitude' -> '...q_proj.lora_magnitude_vector')."""
    module, tensor = name.rsplit(".", 1)
    return f"{_PREFIX}{_hf_module(module)}.{_PEFT_TENSORS[tensor]}"


def peft_to_lit_key(key: str) -> str:
    """The inverse of `lit_to_peft_key`; KeyError for anything that is not a LoRA tensor of a Llama layer."""
    for ours, theirs in _PEFT_TENSORS.items():
        if key.startswith(_PREFIX) and key.endswith("." + theirs):
            module = key[len(_PREFIX): -len(theirs) - 1]
            return f"{hf_to_lit_name(module + '.weight')[: -len('.weight')]}.{ours}"
    raise KeyError(key)


def _peft_pattern_key(patterns: Sequence[str], module: str) -> Optional[str]:
    """PEFT's rule for rank_pattern / alpha_pattern: the first key that, as a regular expression, matches
    the end of the module's name at a dot boundary."""
    try:
        return next((key for key in patterns if re.match(rf"(.*\.)?({key})$", module)), None)
    except re.error as error:
        raise CheckpointError(f"a rank_pattern / alpha_pattern key is not a valid regular expression ({error})") from None


def save_peft_adapter(output_dir: Union[str, Path], lora_config: LoRAConfig, state: Mapping[str, torch.Tensor],
                      base_model_name_or_path: Optional[str] = None) -> Path:
    """Write `adapter_config.json` + `adapter_model.safetensors` that `PeftModel.from_pretrained`
    loads onto the Hugging Face version of the base model."""
    not_llama = [t for t in lora_config.targets if t not in LLAMA_TARGETS]
    if not_llama:
        raise ValueError(f"only adapters on Llama layers ({', '.join(LLAMA_TARGETS)}) can be exported to PEFT; "
                         f"this one targets {not_llama}")
    # PEFT matches target_modules against the end of module names: 'q' -> 'q_proj', 'head' -> 'lm_head',
    # the last component of the Hugging Face name of the target's module in layer 0.
    target_modules = [_hf_module(LLAMA_TARGETS[t].replace("*", "0")).rsplit(".", 1)[-1] for t in lora_config.targets]
    modules = sorted({name.rsplit(".", 1)[0] for name in state})
    rank_pattern = {_hf_module(m): lora_config.rank_and_alpha(m)[0] for m in modules
                    if lora_config.rank_and_alpha(m)[0] != lora_config.r}
    alpha_pattern = {_hf_module(m): lora_config.rank_and_alpha(m)[1] for m in modules
                     if lora_config.rank_and_alpha(m)[1] != lora_config.alpha}
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": lora_config.r,
        "lora_alpha": lora_config.alpha,
        "lora_dropout": lora_config.dropout,
        "target_modules": target_modules,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": lora_config.use_rslora,
        "use_dora": lora_config.use_dora,
        "rank_pattern": rank_pattern,  # explicit module names: PEFT matches them as they are
        "alpha_pattern": alpha_pattern,
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
    }
    with removed_on_failure(output_dir) as output_dir:  # a failed write (a full disk) leaves no new directory
        save_tensors({lit_to_peft_key(name): t for name, t in state.items()}, output_dir / PEFT_WEIGHTS_NAME,
                     metadata={"format": "pt"})
        save_json(adapter_config, output_dir / PEFT_CONFIG_NAME)
    return output_dir


def load_peft_adapter(peft_dir: Union[str, Path], model_config: Config) -> Tuple[LoRAConfig, Dict[str, torch.Tensor], List[str]]:
    """Read a PEFT LoRA adapter for a Llama with architecture `model_config`.

    Returns (LoRAConfig, lit-lora adapter state, ignored keys). The targets are read from the
    tensors present; they must cover every layer. The one key ignored is the full copy of lm_head
    that PEFT stores beside an adapter on lm_head: its shape is checked against the base (a resized
    vocabulary cannot be represented), its values are the base model's own.
    """
    peft_dir = Path(peft_dir)
    config_path, weights_path = peft_dir / PEFT_CONFIG_NAME, peft_dir / PEFT_WEIGHTS_NAME
    if not weights_path.is_file() and (peft_dir / "adapter_model.bin").is_file():
        raise CheckpointError(f"{peft_dir} holds a pickled adapter_model.bin, which is not loaded for safety; "
                              "re-save it with PEFT's save_pretrained(..., safe_serialization=True)")
    adapter_config: Dict[str, Any] = load_json(config_path)
    if not isinstance(adapter_config, dict):
        raise CheckpointError(f"{config_path}: expected a JSON object, found {type(adapter_config).__name__}")
    if adapter_config.get("peft_type") != "LORA":
        raise CheckpointError(f"{config_path}: peft_type is {adapter_config.get('peft_type')!r}, not 'LORA'")
    for field, off, meaning in _UNSUPPORTED_PEFT_OPTIONS:
        value = adapter_config.get(field)
        if value and value != off:
            raise CheckpointError(f"{config_path}: {field}={adapter_config[field]!r} ({meaning}) is not supported by lit-lora's LoRA")
    init = adapter_config.get("init_lora_weights", True)
    if not any(init is exact or init == exact for exact in _EXACT_INITS):
        raise CheckpointError(f"{config_path}: init_lora_weights={init!r} adapts a modified base model, which lit-lora "
                              "cannot reproduce; only adapters initialised with true, false or 'gaussian' import")
    alpha, dropout = adapter_config.get("lora_alpha"), adapter_config.get("lora_dropout", 0.0)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise CheckpointError(f"{config_path}: lora_alpha must be a number, got {alpha!r}")
    if dropout is None:
        dropout = 0.0
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)):
        raise CheckpointError(f"{config_path}: lora_dropout must be a number, got {dropout!r}")
    tensors, _ = load_tensors(weights_path)

    state, ignored, modules = {}, [], []
    for key, tensor in tensors.items():
        if key == _HEAD_COPY:
            if tuple(tensor.shape) != (model_config.vocab_size, model_config.n_embd):
                raise CheckpointError(f"{weights_path}: {key} {tuple(tensor.shape)} is not this base model's lm_head "
                                      f"({model_config.vocab_size}, {model_config.n_embd}): a resized vocabulary?")
            ignored.append(key)
            continue
        try:
            name = peft_to_lit_key(key)
        except KeyError:
            raise CheckpointError(f"{weights_path}: {key!r} is not a LoRA weight of a Llama layer") from None
        state[name] = tensor
        modules.append(name.rsplit(".", 1)[0])
    targets = tuple(t for t in LLAMA_TARGETS if any(fnmatchcase(m, LLAMA_TARGETS[t]) for m in modules))
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(adapter_config.get(key) or {}, dict):
            raise CheckpointError(f"{config_path}: {key} must be a JSON object mapping module name patterns to "
                                  f"{'ranks' if key == 'rank_pattern' else 'alphas'}, got a JSON "
                                  f"{type(adapter_config[key]).__name__}")
    rank_pattern, alpha_pattern = {}, {}  # PEFT's patterns resolved to the adapted modules' names
    for module in dict.fromkeys(modules):
        rank_key = _peft_pattern_key(adapter_config.get("rank_pattern") or {}, _hf_module(module))
        alpha_key = _peft_pattern_key(adapter_config.get("alpha_pattern") or {}, _hf_module(module))
        if rank_key is not None:
            rank_pattern[module] = adapter_config["rank_pattern"][rank_key]
        if alpha_key is not None:
            alpha_pattern[module] = adapter_config["alpha_pattern"][alpha_key]
    try:
        lora_config = LoRAConfig(r=adapter_config["r"], alpha=alpha, dropout=dropout, targets=targets,
                                 use_rslora=bool(adapter_config.get("use_rslora")),
                                 use_dora=bool(adapter_config.get("use_dora")),
                                 rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
    except (KeyError, ValueError) as error:
        raise CheckpointError(f"{config_path}: unusable LoRA settings ({error})") from None
    check_keys_and_shapes(lora_state_shapes(model_config, lora_config), state, f"{weights_path} (read as {lora_config})")
    return lora_config, state, ignored
