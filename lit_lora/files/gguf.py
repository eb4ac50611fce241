"""GGUF in: the model people already run in llama.cpp, Ollama or LM Studio, as a lit-lora checkpoint to finetune.

GGUF is llama.cpp's single-file format:

    [magic "GGUF", version] [metadata: key -> value]          llama.block_count = 30, tokenizer.ggml.tokens = [...]
    [tensor table: name, shape, ggml type, offset]            blk.0.attn_q.weight (576, 576) Q4_1 @ 1785664
    [tensor data, each in its own ggml type]                  F32, F16, BF16, Q8_0, Q4_1, Q4_K, Q6_K, ...

A quantized type stores a block of weights (32, or 256 for the "K" types) as small integers plus the
block's scale (and, for the "_1" and some K types, its minimum): Q4_1 keeps w = d * q + m with q in
0..15, 20 bytes for 32 weights. Dequantizing gives back the float values llama.cpp computes with, so
the imported checkpoint is an ordinary full-precision model with exactly the quantized model's
behaviour; LoRA then trains on top of it like on any other base.

The importer follows the recipe of `convert.py`:

    1. read the metadata and the tensor table (no tensor data), build the `Config`, map every tensor
       name to ours and check every key, shape and ggml type before a byte is written;
    2. stream: read one tensor's bytes, dequantize them to float32 with llama.cpp's own `gguf` package
       (an optional extra: pip install gguf), undo the q/k row permutation, cast, append, drop, next:
       peak memory is about one tensor;
    3. rebuild the tokenizer, which a GGUF stores as metadata (tokens, merges, token types, the name
       of its pre-tokenizer, special token ids, the chat template), as the Hugging Face files
       `tokenizer.json`, `tokenizer_config.json` and `generation_config.json` beside the weights.
"""

import re
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch

from lit_lora.files.checkpoint import (CONFIG_NAME, WEIGHTS_NAME, CheckpointError, atomic_path, refuse_to_overwrite,
                                       removed_on_failure, save_json)
from lit_lora.files.convert import (HF_GENERATION_CONFIG_NAME, HF_TOKENIZER_CONFIG_NAME, HF_TOKENIZER_JSON_NAME, Layout,
                                    _check_plan, _one_line, meta_to_rotate_half, save_tensors_streaming)
from lit_lora.files.utils import PathLike
from lit_lora.model import Config


def _gguf():
    """llama.cpp's `gguf` package, imported when needed: it is an optional extra."""
    try:
        import gguf
    except ImportError:
        raise ImportError("reading GGUF files needs the gguf package: pip install gguf "
                          "(or pip install -e \".[gguf]\")") from None
    return gguf


# The ggml types this importer reads (each one checked against gguf.quants in tests/test_gguf.py).
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")

# GGUF tensor name pattern -> ours ({} is the layer index). llama.cpp's names for the llama architecture.
_GGUF_TO_LIT = {
    "token_embd.weight": "tok_embeddings.weight",
    "blk.{}.attn_norm.weight": "layers.{}.attn_norm.weight",
    "blk.{}.attn_q.weight": "layers.{}.attn.q_proj.weight",
    "blk.{}.attn_k.weight": "layers.{}.attn.k_proj.weight",
    "blk.{}.attn_v.weight": "layers.{}.attn.v_proj.weight",
    "blk.{}.attn_output.weight": "layers.{}.attn.o_proj.weight",
    "blk.{}.ffn_norm.weight": "layers.{}.mlp_norm.weight",
    "blk.{}.ffn_gate.weight": "layers.{}.mlp.gate_proj.weight",
    "blk.{}.ffn_up.weight": "layers.{}.mlp.up_proj.weight",
    "blk.{}.ffn_down.weight": "layers.{}.mlp.down_proj.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_INDEX = re.compile(r"^blk\.(\d+)\.")


def gguf_to_lit_name(name: str) -> str:
    """'blk.3.attn_q.weight' -> 'layers.3.attn.q_proj.weight'; KeyError if it is not a Llama tensor."""
    match = _LAYER_INDEX.match(name)
    pattern = _LAYER_INDEX.sub("blk.{}.", name, count=1) if match else name
    return _GGUF_TO_LIT[pattern].format(match.group(1)) if match else _GGUF_TO_LIT[pattern]


# ---------------------------------------------------------------------------------------------------
# Reading the file: metadata, the tensor table, one tensor's values
# ---------------------------------------------------------------------------------------------------


class GGUFFile:
    """The metadata and tensor table of a GGUF file (llama.cpp's `gguf.GGUFReader`), with one-line errors.

    Only the header is parsed here; `read(name)` reads and dequantizes one tensor."""

    def __init__(self, path: PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path} not found")
        gguf = _gguf()
        try:
            self._reader = gguf.GGUFReader(self.path)
        except (ValueError, OSError, IndexError, KeyError, UnicodeDecodeError) as error:
            raise CheckpointError(f"{self.path} is not a readable GGUF file (truncated or corrupt?): {_one_line(error)}") from None
        self.tensors = {tensor.name: tensor for tensor in self._reader.tensors}

    def get(self, key: str, default: Any = None) -> Any:
        """A metadata value (a list for arrays), or `default` when the file does not have the key."""
        field = self._reader.fields.get(key)
        return default if field is None else field.contents()

    def require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise CheckpointError(f"{self.path}: metadata {key!r} is missing (not a complete llama.cpp model file?)")
        return value

    def shape(self, name: str) -> Tuple[int, ...]:
        """PyTorch's shape of a tensor: ggml lists the dimensions fastest-moving first, so reversed."""
        return tuple(int(size) for size in reversed(self.tensors[name].shape.tolist()))

    def type_name(self, name: str) -> str:
        return self.tensors[name].tensor_type.name

    def read(self, name: str) -> torch.Tensor:
        """One tensor, dequantized to float32 (its stored bytes only are read: no memory map of the file)."""
        gguf = _gguf()
        tensor = self.tensors[name]
        shape = self.shape(name)
        raw = bytearray(int(tensor.n_bytes))  # a writable buffer: torch.from_numpy wants one
        with open(self.path, "rb") as f:
            f.seek(int(tensor.data_offset))
            if f.readinto(raw) != len(raw):
                raise CheckpointError(f"{self.path}: tensor {name!r} is cut short (truncated download?)")
        # (rows..., bytes per row): the layout gguf.quants expects, blocks of one row side by side
        blocks = np.frombuffer(raw, dtype=np.uint8).reshape(gguf.quants.quant_shape_to_byte_shape(shape, tensor.tensor_type))
        values = gguf.quants.dequantize(blocks, tensor.tensor_type)  # float32, shape
        return torch.from_numpy(values.astype(np.float32, copy=False).reshape(shape))


# ---------------------------------------------------------------------------------------------------
# The model: metadata -> Config, tensors -> our names, the rotary layout
# ---------------------------------------------------------------------------------------------------


def gguf_config(file: GGUFFile) -> Config:
    """Our `Config` from the metadata of a llama-architecture GGUF; a one-line error for what lit-lora's
    Llama cannot run (another architecture, RoPE scaling, a mixture of experts, partial rotary)."""
    architecture = file.require("general.architecture")
    if architecture != "llama":
        raise CheckpointError(f"{file.path}: architecture {architecture!r} is not supported (only 'llama', "
                              "the architecture of Llama, SmolLM and their relatives)")
    arch = f"{architecture}."
    if file.get(arch + "expert_count", 0):
        raise CheckpointError(f"{file.path}: a mixture of experts ({arch}expert_count = {file.get(arch + 'expert_count')}) is not supported")
    scaling = file.get(arch + "rope.scaling.type", "none")
    if scaling != "none" or "rope_freqs.weight" in file.tensors:
        raise CheckpointError(f"{file.path}: RoPE scaling ({scaling if scaling != 'none' else 'rope_freqs.weight'}) "
                              "is not supported by lit-lora's Llama")
    n_embd, n_head = int(file.require(arch + "embedding_length")), int(file.require(arch + "attention.head_count"))
    head_size = n_embd // n_head
    for key in ("rope.dimension_count", "attention.key_length", "attention.value_length"):
        value = file.get(arch + key)
        if value is not None and int(value) != head_size:
            raise CheckpointError(f"{file.path}: {arch}{key} = {value} differs from the head size {head_size} "
                                  "(embedding_length / head_count), which lit-lora's Llama assumes")
    tokens = file.get("tokenizer.ggml.tokens") or []
    vocab_size = file.get(arch + "vocab_size") or len(tokens) or file.shape("token_embd.weight")[0]
    try:
        return Config(
            name=file.path.stem,
            block_size=int(file.get(arch + "context_length", 4096)),
            vocab_size=int(vocab_size),
            n_layer=int(file.require(arch + "block_count")),
            n_head=n_head,
            n_embd=n_embd,
            n_kv_heads=int(file.get(arch + "attention.head_count_kv") or n_head),
            intermediate_size=int(file.require(arch + "feed_forward_length")),
            rope_theta=float(file.get(arch + "rope.freq_base", 10000.0)),
            norm_eps=float(file.get(arch + "attention.layer_norm_rms_epsilon", 1e-5)),
            tie_embeddings="output.weight" not in file.tensors,  # no head of its own: it is the embedding
        )
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{file.path}: invalid model metadata ({error})") from None


def gguf_plan(file: GGUFFile) -> Dict[str, str]:
    """Our name -> the GGUF tensor, in file order, every name and ggml type checked (shapes: `_check_plan`)."""
    plan: Dict[str, str] = {}
    for name in file.tensors:
        try:
            plan[gguf_to_lit_name(name)] = name
        except KeyError:
            raise CheckpointError(f"{file.path}: unexpected tensor {name!r} (not part of a Llama model)") from None
        type_name = file.type_name(name)
        if type_name not in SUPPORTED_TYPES:
            raise CheckpointError(f"{file.path}: tensor {name!r} has quantization type {type_name}, which this importer "
                                  f"does not read (supported: {', '.join(SUPPORTED_TYPES)}); re-quantize the model "
                                  "with llama-quantize or download another quantization of it")
    return plan


def gguf_to_rotate_half(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo the row permutation llama.cpp's converter applies to q and k of a Hugging Face Llama.

    llama.cpp's rotary kernel for the llama architecture rotates neighbouring features (2i, 2i+1) of a
    head together, as Meta's original code does; Hugging Face and lit-lora rotate feature i with
    feature i + hs/2 ("rotate half", see `model.rope_cos_sin`). So `convert_hf_to_gguf.py` reorders the
    rows of every q and k head from rotate-half to Meta's interleaved layout, and a GGUF holds q and k
    in Meta's layout: the permutation back is the one the Meta converter makes (`meta_to_rotate_half`),
    per query head for q and per key/value head for k.
    """
    return meta_to_rotate_half(weight, n_heads)


# ---------------------------------------------------------------------------------------------------
# The tokenizer: GGUF metadata -> tokenizer.json (byte-level BPE), tokenizer_config.json, generation_config.json
# ---------------------------------------------------------------------------------------------------

_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp's token types (1 normal, 2 unknown, 5 unused, 6 byte)

# Llama 3's split (tiktoken's cl100k pattern): contractions, letters, numbers up to 3 digits, symbols, spaces.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _pre_tokenizers() -> Dict[str, Callable[[], Any]]:
    """llama.cpp's pre-tokenizer names (`tokenizer.ggml.pre`) -> the `tokenizers` pre-tokenizer that splits
    text the same way before the merges apply (llama.cpp's llama-vocab.cpp lists each one's regexes)."""
    from tokenizers import Regex, pre_tokenizers

    def byte_level():  # GPT-2's split: 's 't ..., ' ?\p{L}+', ' ?\p{N}+', ' ?[^\s\p{L}\p{N}]+', spaces
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)

    return {
        "gpt-2": byte_level,
        # SmolLM, StarCoder: every digit alone first ('\p{N}'), then GPT-2's split.
        "smollm": lambda: pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level()]),
        "llama-bpe": lambda: pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
                                                      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
    }


def _token(tokens: List[str], metadata_key: str, file: GGUFFile) -> Optional[str]:
    token_id = file.get(metadata_key)
    if token_id is None:
        return None
    if not 0 <= int(token_id) < len(tokens):
        raise CheckpointError(f"{file.path}: {metadata_key} = {token_id} is outside the vocabulary of {len(tokens)} tokens")
    return tokens[int(token_id)]


def gguf_tokenizer_files(file: GGUFFile, context_length: int) -> Dict[str, Any]:
    """{file name: contents} of the Hugging Face tokenizer files the GGUF's metadata describes:
    `tokenizer.json` (a string, from the `tokenizers` library), `tokenizer_config.json` and
    `generation_config.json` (dicts). Only byte-level BPE vocabularies ("gpt2", as llama.cpp calls
    them: Llama 3, SmolLM, Qwen, ...) are rebuilt; a SentencePiece one ("llama": Llama 2) is an error."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    model = file.require("tokenizer.ggml.model")
    if model != "gpt2":
        raise CheckpointError(f"{file.path}: tokenizer model {model!r} is not supported (only byte-level BPE, 'gpt2'); "
                              "for a Llama 2 model use its tokenizer.model with scripts/convert_hf_checkpoint.py")
    pre = file.get("tokenizer.ggml.pre", "default")
    builders = _pre_tokenizers()
    if pre not in builders:
        raise CheckpointError(f"{file.path}: pre-tokenizer {pre!r} is not supported (supported: {', '.join(builders)})")
    tokens: List[str] = file.require("tokenizer.ggml.tokens")
    token_types: List[int] = file.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = []
    for merge in file.require("tokenizer.ggml.merges"):
        pair = merge.split(" ")
        if len(pair) != 2:
            raise CheckpointError(f"{file.path}: merge {merge!r} is not two tokens separated by a space")
        merges.append(tuple(pair))
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        duplicate = next(token for index, token in enumerate(tokens) if vocab[token] != index)
        raise CheckpointError(f"{file.path}: token {duplicate!r} appears twice in tokenizer.ggml.tokens")

    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=pre == "llama-bpe"))
    tokenizer.pre_tokenizer = builders[pre]()
    tokenizer.decoder = decoders.ByteLevel()
    # Control tokens (<|im_start|>, <|begin_of_text|>) are matched whole and are special; user-defined
    # ones (<think>) are matched whole too but are ordinary text. Neither is split by the pre-tokenizer.
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True)
                                  for t, kind in zip(tokens, token_types) if kind == _CONTROL])
    tokenizer.add_tokens([AddedToken(t, normalized=False, special=False)
                          for t, kind in zip(tokens, token_types) if kind == _USER_DEFINED])

    bos, eos = _token(tokens, "tokenizer.ggml.bos_token_id", file), _token(tokens, "tokenizer.ggml.eos_token_id", file)
    add_bos, add_eos = bool(file.get("tokenizer.ggml.add_bos_token", False)), bool(file.get("tokenizer.ggml.add_eos_token", False))
    if (add_bos and bos is None) or (add_eos and eos is None):
        raise CheckpointError(f"{file.path}: the tokenizer adds a BOS/EOS token but names none")
    prefix, suffix = ([bos] if add_bos else []), ([eos] if add_eos else [])
    if prefix or suffix:  # what every encoded text starts or ends with
        single = [*prefix, "$A", *suffix]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=" ".join(single), pair=" ".join(single + [f"{t}:1" if t != "$A" else "$B:1" for t in single]),
            special_tokens=[(t, vocab[t]) for t in dict.fromkeys(prefix + suffix)])

    special = {"bos_token": bos, "eos_token": eos, "unk_token": _token(tokens, "tokenizer.ggml.unknown_token_id", file),
               "pad_token": _token(tokens, "tokenizer.ggml.padding_token_id", file)}
    tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", **{k: v for k, v in special.items() if v is not None},
                        "add_bos_token": add_bos, "add_eos_token": add_eos, "model_max_length": context_length,
                        "clean_up_tokenization_spaces": False}
    chat_template = file.get("tokenizer.chat_template")
    if chat_template is not None:
        tokenizer_config["chat_template"] = chat_template
    # Generation stops at EOS and, for chat models, at the end-of-turn token when it is another one.
    stop_ids = [int(file.get(key)) for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                                               "tokenizer.ggml.eom_token_id") if file.get(key) is not None]
    generation_config = {key: value for key, value in (
        ("bos_token_id", file.get("tokenizer.ggml.bos_token_id")),
        ("eos_token_id", (list(dict.fromkeys(stop_ids)) if len(set(stop_ids)) > 1 else stop_ids[0]) if stop_ids else None),
        ("pad_token_id", file.get("tokenizer.ggml.padding_token_id"))) if value is not None}
    return {HF_TOKENIZER_JSON_NAME: tokenizer.to_str(), HF_TOKENIZER_CONFIG_NAME: tokenizer_config,
            HF_GENERATION_CONFIG_NAME: generation_config}


# ---------------------------------------------------------------------------------------------------
# GGUF -> lit-lora checkpoint directory
# ---------------------------------------------------------------------------------------------------


def convert_gguf_checkpoint(gguf_path: PathLike, output_dir: Optional[PathLike] = None,
                            dtype: torch.dtype = torch.float32, overwrite: bool = False) -> Path:
    """A llama-architecture GGUF file -> lit-lora checkpoint directory (by default, the file's directory)
    with the Hugging Face tokenizer files beside it. Every tensor is dequantized to float32 (the values
    llama.cpp computes with), then stored as `dtype`."""
    file = GGUFFile(gguf_path)
    config = gguf_config(file)
    plan = gguf_plan(file)
    layout: Layout = {name: (file.shape(source), dtype) for name, source in plan.items()}
    _check_plan(config, layout, str(file.path), file.path)
    side_files = gguf_tokenizer_files(file, config.block_size)  # before any weight: a bad tokenizer fails fast

    def tensors() -> Iterator[Tuple[str, torch.Tensor]]:
        for name, source in plan.items():
            weight = file.read(source)
            if name.endswith("attn.q_proj.weight"):
                weight = gguf_to_rotate_half(weight, config.n_head)
            elif name.endswith("attn.k_proj.weight"):
                weight = gguf_to_rotate_half(weight, config.n_kv_heads)
            yield name, weight.to(dtype)

    output_dir = Path(output_dir) if output_dir is not None else file.path.parent
    refuse_to_overwrite(output_dir / WEIGHTS_NAME, overwrite)
    with removed_on_failure(output_dir):
        save_tensors_streaming(output_dir / WEIGHTS_NAME, layout, tensors(), metadata={"format": "pt"})
        for name, contents in side_files.items():
            if isinstance(contents, str):
                with atomic_path(output_dir / name) as tmp:
                    tmp.write_text(contents)
            else:
                save_json(contents, output_dir / name)
        save_json(config.to_dict(), output_dir / CONFIG_NAME)  # last: a config means the whole checkpoint is there
    return output_dir
