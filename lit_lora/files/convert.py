"""Weights in and out: Hugging Face and Meta checkpoints to lit-lora, and lit-lora back to Hugging Face.

Three converters share one recipe, so converting Llama-2-7B never holds two copies of it in memory:

    1. read only the *headers* of the source files (names, shapes, dtypes: no tensor data),
    2. map every name to ours and check all keys and shapes against the model the config describes,
       before a single byte is written (a wrong or incomplete checkpoint fails in a second),
    3. stream: load one tensor, convert it, append it to the output file, drop it, next.

    source shards ──headers──► plan {name: (shape, dtype)} ──check──► output header
         │                                                                │
         └──── one tensor at a time: load ► rename/merge/permute ► cast ► append ──► lit_model.safetensors

Step 3 needs a safetensors writer that does not want every tensor in a dict up front:
`save_tensors_streaming` writes the header from the plan, then the tensors one by one. Safetensors
sources are read with `pread` (no memory map), so a tensor's bytes are resident only while it is
converted. PyTorch `.bin`/`.pth` sources are memory-mapped (`torch.load(mmap=True)`) afresh for every
layer, so the file pages in memory never exceed about one layer. Peak memory is therefore about one
or two copies of the largest tensor, whatever the model size (benchmarks/benchmark_convert_memory.py).

Formats:
  * Hugging Face: `config.json` + `model.safetensors` | `model-0000i-of-0000n.safetensors` with
    `model.safetensors.index.json` | the same as `pytorch_model*.bin`. Same rotary layout as ours
    (see `model.rope_cos_sin`), so converting is a renaming (`hf_names`).
  * Meta's original release: `params.json` + `consolidated.00.pth` ... one file per tensor-parallel
    rank (1 for 7B, 2 for 13B, 8 for 70B). Each rank holds a slice of most matrices: we concatenate
    the slices and permute the q/k rows from Meta's interleaved rotary layout to rotate-half.
"""

import json
import math
import pickle
import re
import struct
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from itertools import groupby
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import torch
from safetensors import SafetensorError, safe_open

from lit_lora.files.checkpoint import (CONFIG_NAME, HF_TOKENIZER_NAME, TOKENIZER_NAME, WEIGHTS_NAME, CheckpointError, atomic_path,
                                       check_finite, check_keys_and_shapes, copy_tokenizer_files, load_config, load_json,
                                       model_state_shapes, refuse_to_overwrite, removed_on_failure, save_json, tokenizer_file)
from lit_lora.files.hf_names import config_from_hf, config_to_hf, hf_to_lit_name, lit_to_hf_name
from lit_lora.files.utils import PathLike, inside
from lit_lora.model import Config, Llama


HF_CONFIG_NAME = "config.json"
HF_WEIGHTS_NAME = "model.safetensors"
# The Hugging Face files that describe the tokenizer and generation (checkpoint.TOKENIZER_FILES carries them along).
HF_TOKENIZER_JSON_NAME = HF_TOKENIZER_NAME
HF_TOKENIZER_CONFIG_NAME = "tokenizer_config.json"
HF_GENERATION_CONFIG_NAME = "generation_config.json"
META_PARAMS_NAME = "params.json"
Shape = Tuple[int, ...]
Layout = Dict[str, Tuple[Shape, torch.dtype]]  # tensor name -> (shape, dtype), in file order

_SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
_TORCH_DTYPES = {code: dtype for dtype, code in _SAFETENSORS_DTYPES.items()}
_BROKEN_FILE_ERRORS = (SafetensorError, RuntimeError, OSError, EOFError, ValueError, KeyError)


# ---------------------------------------------------------------------------------------------------
# Writing and reading tensor files one tensor at a time
# ---------------------------------------------------------------------------------------------------


def save_tensors_streaming(path: PathLike, layout: Layout, tensors: Iterable[Tuple[str, torch.Tensor]],
                           metadata: Optional[Dict[str, str]] = None) -> None:
    """Write a safetensors file from a plan of names/shapes/dtypes and a stream of tensors, atomically.

    The safetensors format is simple enough to write by hand:

        [8 bytes: N, little-endian] [N bytes: JSON header] [tensor bytes, back to back]
        header = {"__metadata__": {...}, name: {"dtype": "BF16", "shape": [..], "data_offsets": [begin, end]}}

    Offsets count from the end of the header, so the header can be written before any tensor exists:
    at most one tensor is in memory at a time. `tensors` must yield exactly the plan, in order, and be
    finite (a NaN or infinite value stops the writing with a `CheckpointError`; no file is left).
    """
    header: Dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, (shape, dtype) in layout.items():
        if dtype not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{name}: dtype {dtype} is not a floating-point type this converter writes")
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)  # pad with spaces so the data starts 8-byte aligned

    with atomic_path(path) as tmp, open(tmp, "wb") as out:
        out.write(struct.pack("<Q", len(header_bytes)))
        out.write(header_bytes)
        plan = iter(layout.items())
        for name, tensor in tensors:
            planned = next(plan, None)
            if planned != (name, (tuple(tensor.shape), tensor.dtype)):
                raise RuntimeError(f"{path}: tensor {name} {tuple(tensor.shape)} {tensor.dtype} does not follow the plan {planned}")
            check_finite({name: tensor}, f"the checkpoint converted to {path}")  # a converted NaN would look fine until used
            # A byte view of the (contiguous) tensor: written without another copy.
            out.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
            del tensor  # before the next one is made: one tensor in memory, not two
        if next(plan, None) is not None:
            raise RuntimeError(f"{path}: the tensor stream ended before the plan")


def _read_header(path: Path) -> Dict[str, Tuple[Shape, torch.dtype]]:
    """Names, shapes and dtypes of the tensors in a .safetensors or PyTorch (.bin/.pth) file, without
    reading their data. A missing, truncated or corrupt file is a one-line `CheckpointError`."""
    if not path.is_file():
        raise CheckpointError(f"{path} not found")
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt", backend="pread") as f:
                slices = {key: f.get_slice(key) for key in f.keys()}
                return {key: (tuple(s.get_shape()), _safetensors_dtype(s.get_dtype(), path, key)) for key, s in slices.items()}
        state = _torch_load(path)
        return {key: (tuple(t.shape), t.dtype) for key, t in state.items()}
    except CheckpointError:
        raise
    except pickle.UnpicklingError:
        raise CheckpointError(f"{path} holds Python objects besides tensors: refusing to unpickle them (only "
                              "plain weight files are loaded, with torch.load(weights_only=True))") from None
    except _BROKEN_FILE_ERRORS as error:
        raise CheckpointError(f"{path} is unreadable (truncated or corrupt?): {_one_line(error)}") from None


def _safetensors_dtype(code: str, path: Path, key: str) -> torch.dtype:
    if code not in _TORCH_DTYPES:
        raise CheckpointError(f"{path}: tensor {key!r} has dtype {code}, not a floating-point weight")
    return _TORCH_DTYPES[code]


def _torch_load(path: Path) -> Dict[str, torch.Tensor]:
    """A PyTorch checkpoint as a dict of memory-mapped tensors. weights_only=True: no code is unpickled."""
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as error:
        with open(path, "rb") as f:
            pickled = f.read(1) == b"\x80"  # the pickle PROTO opcode a legacy torch.save file starts with
        if "mmap" not in str(error) or not pickled:
            raise
        # A file written by torch < 1.6 (the legacy, non-zip format) cannot be memory-mapped: read it whole.
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise CheckpointError(f"{path} does not hold a flat dict of tensors")
    return state


@contextmanager
def _open_tensors(path: Path) -> Iterator[Callable[[str], torch.Tensor]]:
    """Yield `get(key) -> tensor` for one file; reading errors become `CheckpointError`s naming it."""
    def guarded(get: Callable[[str], torch.Tensor]) -> Callable[[str], torch.Tensor]:
        def get_tensor(key: str) -> torch.Tensor:
            try:
                return get(key)
            except _BROKEN_FILE_ERRORS as error:
                raise CheckpointError(f"{path}: could not read tensor {key!r} (truncated or corrupt?): {_one_line(error)}") from None
        return get_tensor

    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt", backend="pread") as f:
            yield guarded(f.get_tensor)
    else:
        state = _torch_load(path)
        yield guarded(state.__getitem__)
        del state  # unmaps the file: its pages stop counting towards this process


def _by_layer(names: Iterable[str]) -> Iterator[List[str]]:
    """Consecutive names grouped by layer ('layers.3.attn.q_proj.weight' -> layer 3; others alone).

    The converters open memory-mapped PyTorch files afresh for each group: the pages of finished layers
    are unmapped with them, so resident memory stays around one layer instead of growing to the file."""
    for _, group in groupby(names, key=lambda name: name.split(".")[1] if name.startswith("layers.") else name):
        yield list(group)


def _one_line(error: BaseException, limit: int = 300) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------------------
# Writing a converted checkpoint directory
# ---------------------------------------------------------------------------------------------------


def _check_plan(config: Config, layout: Layout, source: str, config_path: Path) -> None:
    """Every key and shape the planned checkpoint holds, against the model `config` describes."""
    with torch.device("meta"):  # shapes only: no memory, no random init
        expected = model_state_shapes(Llama(config))
        planned = {name: torch.empty(shape) for name, (shape, _) in layout.items()}
    try:
        check_keys_and_shapes(expected, planned, source)
    except CheckpointError as error:
        raise CheckpointError(f"{error} (the model described by {config_path})") from None


def _write_lit_checkpoint(output_dir: Path, config: Config, layout: Layout,
                          tensors: Iterable[Tuple[str, torch.Tensor]], tokenizer: Optional[Path], overwrite: bool) -> Path:
    """Weights first (the step that can still fail on a bad file), then the tokenizer, and last the config
    that describes them: a directory with a config holds a whole checkpoint, even after an interruption."""
    refuse_to_overwrite(output_dir / WEIGHTS_NAME, overwrite)
    with removed_on_failure(output_dir):
        save_tensors_streaming(output_dir / WEIGHTS_NAME, layout, tensors, metadata={"format": "pt"})
        if tokenizer is not None:
            copy_tokenizer_files(tokenizer, output_dir)
        save_json(config.to_dict(), output_dir / CONFIG_NAME)
    return output_dir


# ---------------------------------------------------------------------------------------------------
# Hugging Face -> lit-lora
# ---------------------------------------------------------------------------------------------------


def hf_weight_files(checkpoint_dir: PathLike) -> List[Path]:
    """The weight files of a Hugging Face checkpoint: safetensors preferred over .bin, sharded
    checkpoints through their `*.index.json` (which names each tensor's shard)."""
    checkpoint_dir = Path(checkpoint_dir)
    for single, index_name in ((HF_WEIGHTS_NAME, "model.safetensors.index.json"), ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        index_path = checkpoint_dir / index_name
        if index_path.is_file():
            index = load_json(index_path)
            weight_map = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index_path} has no 'weight_map' (not a sharded-checkpoint index)")
            files = [inside(checkpoint_dir, str(name), str(index_path))  # unique, in order; never outside the directory
                     for name in dict.fromkeys(weight_map.values())]
            for file in files:
                if not file.is_file():
                    raise CheckpointError(f"{index_path} lists {file.name}, which is missing (incomplete download? "
                                          "rerun scripts/download.py)")
            return files
        if (checkpoint_dir / single).is_file():
            return [checkpoint_dir / single]
    raise CheckpointError(f"no Hugging Face weights in {checkpoint_dir} (expected {HF_WEIGHTS_NAME}, model.safetensors.index.json, "
                          "pytorch_model.bin or pytorch_model.bin.index.json); download them with scripts/download.py")


def load_hf_config(checkpoint_dir: PathLike) -> Config:
    """Our `Config` from a Hugging Face `config.json`, named after the checkpoint when it names nothing."""
    path = Path(checkpoint_dir) / HF_CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{path} not found: is {checkpoint_dir} a Hugging Face checkpoint? Download one with scripts/download.py")
    try:
        config = config_from_hf(load_json(path))
    except KeyError as error:
        raise CheckpointError(f"{path}: missing field {error} of a Llama config") from None
    except (TypeError, ValueError, AttributeError) as error:
        raise CheckpointError(f"{path}: not a supported Llama config ({error})") from None
    return config if config.name else replace(config, name=Path(checkpoint_dir).resolve().name)


def convert_hf_checkpoint(checkpoint_dir: PathLike, output_dir: Optional[PathLike] = None,
                          dtype: Optional[torch.dtype] = None, overwrite: bool = False) -> Path:
    """Hugging Face Llama checkpoint -> lit-lora checkpoint directory (by default, written beside it).

    A pure renaming (same rotary layout); `dtype` casts floating-point weights, None keeps them as stored.
    """
    checkpoint_dir = Path(checkpoint_dir)
    config = load_hf_config(checkpoint_dir)
    files = hf_weight_files(checkpoint_dir)

    sources: Dict[str, Tuple[Path, str]] = {}  # our name -> (file, name inside the file)
    layout: Layout = {}
    for file in files:
        for key, (shape, stored_dtype) in _read_header(file).items():
            if key.endswith("rotary_emb.inv_freq"):  # a buffer older transformers versions saved: we recompute it
                continue
            try:
                name = hf_to_lit_name(key)
            except KeyError:
                raise CheckpointError(f"{file}: unexpected tensor {key!r} (not part of a Llama model)") from None
            if name == "lm_head.weight" and config.tie_embeddings:  # the head is the embedding matrix
                continue
            if name in sources:
                raise CheckpointError(f"{file}: tensor {key!r} is also in {sources[name][0]}")
            sources[name] = (file, key)
            layout[name] = (shape, dtype or stored_dtype)
    described = str(files[0]) if len(files) == 1 else f"the {len(files)} shards in {checkpoint_dir}"
    _check_plan(config, layout, described, checkpoint_dir / HF_CONFIG_NAME)

    def tensors() -> Iterator[Tuple[str, torch.Tensor]]:
        for file in files:  # in the order the plan was made
            for layer in _by_layer(name for name, (source_file, _) in sources.items() if source_file == file):
                with _open_tensors(file) as get:
                    for name in layer:
                        yield name, get(sources[name][1]).to(layout[name][1])

    return _write_lit_checkpoint(Path(output_dir or checkpoint_dir), config, layout, tensors(),
                                 tokenizer_file(checkpoint_dir), overwrite)


# ---------------------------------------------------------------------------------------------------
# Meta's original checkpoints -> lit-lora
# ---------------------------------------------------------------------------------------------------

# Meta name pattern -> (our name pattern, dim along which Meta's tensor-parallel ranks split it).
#   dim 0: column-parallel (each rank computes some output features: q/k/v heads, MLP hidden units, vocab)
#   dim 1: row-parallel (each rank reads some input features) and the embedding (each rank holds C / ranks)
#   None:  replicated (the norms): every rank has the full vector
_META_TO_LIT: Dict[str, Tuple[str, Optional[int]]] = {
    "tok_embeddings.weight": ("tok_embeddings.weight", 1),
    "norm.weight": ("norm.weight", None),
    "output.weight": ("lm_head.weight", 0),
    "layers.{}.attention_norm.weight": ("layers.{}.attn_norm.weight", None),
    "layers.{}.attention.wq.weight": ("layers.{}.attn.q_proj.weight", 0),
    "layers.{}.attention.wk.weight": ("layers.{}.attn.k_proj.weight", 0),
    "layers.{}.attention.wv.weight": ("layers.{}.attn.v_proj.weight", 0),
    "layers.{}.attention.wo.weight": ("layers.{}.attn.o_proj.weight", 1),
    "layers.{}.ffn_norm.weight": ("layers.{}.mlp_norm.weight", None),
    "layers.{}.feed_forward.w1.weight": ("layers.{}.mlp.gate_proj.weight", 0),
    "layers.{}.feed_forward.w2.weight": ("layers.{}.mlp.down_proj.weight", 1),
    "layers.{}.feed_forward.w3.weight": ("layers.{}.mlp.up_proj.weight", 0),
}
_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def _meta_to_lit_name(name: str) -> Tuple[str, Optional[int]]:
    match = _LAYER_INDEX.search(name)
    pattern = _LAYER_INDEX.sub(".{}.", name, count=1) if match else name
    lit_pattern, split_dim = _META_TO_LIT[pattern]  # KeyError: not a Llama tensor
    return (lit_pattern.format(match.group(1)) if match else lit_pattern), split_dim


def meta_intermediate_size(dim: int, multiple_of: int, ffn_dim_multiplier: Optional[float] = None) -> int:
    """The SwiGLU hidden size Meta's code derives from params.json: 2/3 of 4 * dim, times the optional
    multiplier (70B: 1.3), rounded up to a multiple of `multiple_of` (7B: 11008, 13B: 13824, 70B: 28672)."""
    hidden = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * -(-hidden // multiple_of)  # ceil(hidden / multiple_of) in integers


def meta_to_rotate_half(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the rows of a q or k projection from Meta's rotary layout to ours (rotate-half).

    Meta rotates neighbouring features (2i, 2i+1) of a head together, as one complex number; we rotate
    feature i with feature i + hs/2 (see `model.rope_cos_sin`), by the same angle. Moving the rows of
    each head so that the even ones come first and the odd ones second makes the two computations equal:

        Meta, one head:  r0 r1 | r2 r3 | r4 r5 | r6 r7     pairs (2i, 2i+1) rotate by angle i
        ours:            r0 r2 r4 r6 | r1 r3 r5 r7         pairs (i, i + hs/2) rotate by angle i

    q . k is unchanged because q and k get the same permutation. v and o are not touched.
    """
    out_features, C = weight.shape
    hs = out_features // n_heads
    pairs = weight.view(n_heads, hs // 2, 2, C)  # (nh, hs/2, 2, C): row 2i + j of a head at [i, j]
    return pairs.transpose(1, 2).reshape(out_features, C)  # (nh, 2, hs/2, C) -> (nh * hs, C): evens, then odds


def _meta_shard_files(checkpoint_dir: Path) -> List[Path]:
    files = sorted(checkpoint_dir.glob("consolidated.*.pth"))
    if not files:
        raise CheckpointError(f"no consolidated.NN.pth files in {checkpoint_dir}: is it one of Meta's Llama 2 downloads?")
    expected = [checkpoint_dir / f"consolidated.{rank:02d}.pth" for rank in range(len(files))]
    if files != expected:
        raise CheckpointError(f"{checkpoint_dir}: tensor-parallel shards must be consolidated.00.pth ... "
                              f"consolidated.{len(files) - 1:02d}.pth, found {[f.name for f in files]}")
    return files


def _meta_params_path(checkpoint_dir: Path) -> Path:
    path = checkpoint_dir / META_PARAMS_NAME
    if not path.is_file():
        raise CheckpointError(f"{path} not found: Meta's checkpoints come with a params.json beside consolidated.00.pth")
    return path


def load_meta_config(checkpoint_dir: PathLike, vocab_size: int, block_size: int = 4096) -> Config:
    """Our `Config` from Meta's `params.json` (its vocab_size is -1 in the Llama 2 release: the caller
    passes the embedding's row count)."""
    path = _meta_params_path(Path(checkpoint_dir))
    params = load_json(path)
    try:
        dim = params["dim"]
        return Config(
            name=Path(checkpoint_dir).resolve().name,
            block_size=block_size,
            vocab_size=params["vocab_size"] if params.get("vocab_size", -1) > 0 else vocab_size,
            n_layer=params["n_layers"],
            n_head=params["n_heads"],
            n_embd=dim,
            n_kv_heads=params.get("n_kv_heads") or params["n_heads"],
            intermediate_size=meta_intermediate_size(dim, params.get("multiple_of", 256), params.get("ffn_dim_multiplier")),
            rope_theta=float(params.get("rope_theta", 10000.0)),
            norm_eps=params.get("norm_eps", 1e-5),
        )
    except KeyError as error:
        raise CheckpointError(f"{path}: missing field {error}") from None
    except (TypeError, ValueError, AttributeError) as error:
        raise CheckpointError(f"{path}: invalid model parameters ({error})") from None


def convert_meta_checkpoint(checkpoint_dir: PathLike, output_dir: Optional[PathLike] = None,
                            dtype: Optional[torch.dtype] = None, block_size: int = 4096, overwrite: bool = False) -> Path:
    """Meta's original Llama 2 checkpoint (`consolidated.NN.pth` + `params.json`) -> lit-lora directory.

    Joins the tensor-parallel shards along the dimension each weight was split on and permutes the
    q/k rows to the rotate-half layout. `block_size` is the context length (4096 for Llama 2: Meta's
    params.json does not record it). The tokenizer is taken from the directory or its parent.
    """
    checkpoint_dir = Path(checkpoint_dir)
    _meta_params_path(checkpoint_dir)  # fail on a missing params.json before reading any shard
    files = _meta_shard_files(checkpoint_dir)
    headers = [_read_header(file) for file in files]

    plan: Dict[str, Tuple[str, Optional[int]]] = {}  # our name -> (Meta's name, split dim)
    layout: Layout = {}
    for key, (shape, stored_dtype) in headers[0].items():
        if key == "rope.freqs":  # Meta's precomputed rotary frequencies: we recompute them
            continue
        try:
            name, split_dim = _meta_to_lit_name(key)
        except KeyError:
            raise CheckpointError(f"{files[0]}: unexpected tensor {key!r} (not part of a Llama 2 model)") from None
        for file, header in zip(files, headers):
            if key not in header:
                raise CheckpointError(f"{file}: tensor {key!r} is missing (it is in {files[0].name})")
            other = header[key][0]
            if len(other) != len(shape) or any(a != b for d, (a, b) in enumerate(zip(shape, other)) if d != split_dim):
                raise CheckpointError(f"{file}: tensor {key!r} has shape {other}, which does not fit {shape} in {files[0].name}")
        if split_dim is not None:  # the joined shape: the split dim summed over the ranks
            shape = tuple(sum(h[key][0][d] for h in headers) if d == split_dim else size for d, size in enumerate(shape))
        plan[name] = (key, split_dim)
        layout[name] = (shape, dtype or stored_dtype)

    if "tok_embeddings.weight" not in layout:
        raise CheckpointError(f"{files[0]}: no tok_embeddings.weight (not a Llama checkpoint?)")
    config = load_meta_config(checkpoint_dir, vocab_size=layout["tok_embeddings.weight"][0][0], block_size=block_size)
    described = str(files[0]) if len(files) == 1 else f"the {len(files)} shards in {checkpoint_dir}"
    _check_plan(config, layout, described, checkpoint_dir / META_PARAMS_NAME)

    def joined(shards: List[Callable[[str], torch.Tensor]], name: str) -> torch.Tensor:
        key, split_dim = plan[name]
        pieces = [get(key) for get in shards]  # one slice per rank
        weight = pieces[0] if split_dim is None else torch.cat(pieces, dim=split_dim)
        if name.endswith("attn.q_proj.weight"):
            weight = meta_to_rotate_half(weight, config.n_head)
        elif name.endswith("attn.k_proj.weight"):
            weight = meta_to_rotate_half(weight, config.n_kv_heads)
        return weight.to(layout[name][1])

    def tensors() -> Iterator[Tuple[str, torch.Tensor]]:
        for layer in _by_layer(plan):
            with ExitStack() as stack:  # every rank's file, memory-mapped while this layer is joined
                shards = [stack.enter_context(_open_tensors(file)) for file in files]
                for name in layer:
                    yield name, joined(shards, name)

    tokenizer = next((d / TOKENIZER_NAME for d in (checkpoint_dir, checkpoint_dir.parent) if (d / TOKENIZER_NAME).is_file()), None)
    return _write_lit_checkpoint(Path(output_dir or checkpoint_dir), config, layout, tensors(), tokenizer, overwrite)


# ---------------------------------------------------------------------------------------------------
# lit-lora -> Hugging Face
# ---------------------------------------------------------------------------------------------------


def _bos_eos_ids(checkpoint_dir: Path) -> Tuple[Optional[int], object]:
    """The BOS and EOS ids transformers should know: generation_config.json's (EOS may be a list), else those
    tokenizer_config.json names, looked up in tokenizer.json; SentencePiece's 1 and 2 without either."""
    generation, settings = checkpoint_dir / "generation_config.json", checkpoint_dir / "tokenizer_config.json"
    if generation.is_file():
        values = load_json(generation)
        return values.get("bos_token_id"), values.get("eos_token_id")
    if settings.is_file() and (checkpoint_dir / "tokenizer.json").is_file():
        names = {role: token.get("content") if isinstance(token, dict) else token
                 for role, token in load_json(settings).items() if role in ("bos_token", "eos_token")}
        ids = {token["content"]: token["id"] for token in load_json(checkpoint_dir / "tokenizer.json").get("added_tokens", [])}
        return ids.get(names.get("bos_token")), ids.get(names.get("eos_token"))
    return 1, 2


def _pad_id(checkpoint_dir: Path) -> Optional[int]:
    """The padding id generation_config.json records, for config.json (None when it names none)."""
    generation = checkpoint_dir / "generation_config.json"
    return load_json(generation).get("pad_token_id") if generation.is_file() else None


def convert_lit_checkpoint(checkpoint_dir: PathLike, output_dir: PathLike, overwrite: bool = False) -> Path:
    """lit-lora checkpoint -> Hugging Face directory (`config.json`, `model.safetensors`, tokenizer)
    that `transformers.LlamaForCausalLM.from_pretrained` loads. Tensors are copied bit for bit."""
    checkpoint_dir, output_dir = Path(checkpoint_dir), Path(output_dir)
    if output_dir.resolve() == checkpoint_dir.resolve():
        raise ValueError(f"output_dir must differ from checkpoint_dir ({checkpoint_dir}): the export would overwrite its files")
    config = load_config(checkpoint_dir)
    weights = checkpoint_dir / WEIGHTS_NAME
    layout: Layout = _read_header(weights)
    _check_plan(config, layout, str(weights), checkpoint_dir / CONFIG_NAME)
    hf_layout: Layout = {lit_to_hf_name(name): spec for name, spec in layout.items()}

    def tensors() -> Iterator[Tuple[str, torch.Tensor]]:
        with _open_tensors(weights) as get:
            for name in layout:
                yield lit_to_hf_name(name), get(name)

    dtypes = {dtype for _, dtype in layout.values()}
    tokenizer = tokenizer_file(checkpoint_dir)
    hf_config = config_to_hf(config, *_bos_eos_ids(checkpoint_dir))
    pad_id = _pad_id(checkpoint_dir)
    if pad_id is not None:
        hf_config["pad_token_id"] = pad_id
    if len(dtypes) == 1:  # what from_pretrained(dtype="auto") loads the weights as
        hf_config["torch_dtype"] = str(dtypes.pop()).removeprefix("torch.")
    refuse_to_overwrite(output_dir / HF_WEIGHTS_NAME, overwrite)
    with removed_on_failure(output_dir):
        save_tensors_streaming(output_dir / HF_WEIGHTS_NAME, hf_layout, tensors(), metadata={"format": "pt"})
        save_json(hf_config, output_dir / HF_CONFIG_NAME)
        if tokenizer is not None:
            copy_tokenizer_files(tokenizer, output_dir)
    return output_dir

