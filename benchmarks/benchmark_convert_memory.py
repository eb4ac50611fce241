"""Peak memory of the weight converters, against a straightforward load-everything converter.

    python benchmarks/benchmark_convert_memory.py                 # ~340 MB float16 checkpoints (default)
    python benchmarks/benchmark_convert_memory.py --n_layer 16    # bigger

Writes random Llama-2-architecture checkpoints (Hugging Face safetensors in 2 shards, Hugging Face
.bin in 2 shards, Meta's format in 2 tensor-parallel shards) into a temporary directory, then runs
every conversion in a fresh subprocess and reads its peak resident set size (VmHWM in /proc/self/status;
`resource.getrusage(...).ru_maxrss` would not do: on Linux a child inherits the parent's high-water
mark through fork + exec, and the parent here holds a whole random model):

    raw   peak RSS of the whole process
    base  RSS after importing torch, safetensors and lit_lora, before converting
    net   raw - base: what the conversion itself added
    anon  peak anonymous memory (RssAnon, sampled every 5 ms): memory the process really holds. The rest
          of RSS is clean file pages of memory-mapped .bin/.pth inputs, which the kernel drops when short

and prints net / checkpoint size (target: <= 1.3) and the same for the naive reference converter,
which loads all tensors into a dict and saves them with one call.
"""

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, Optional

import torch
from safetensors.torch import load_file, save_file

from lit_lora.files.checkpoint import load_checkpoint, save_checkpoint
from lit_lora.files.convert import meta_intermediate_size, meta_to_rotate_half
from lit_lora.files.hf_names import config_from_hf, config_to_hf, hf_to_lit_name, lit_to_hf_name
from lit_lora.model import Config, Llama
from lit_lora.workflows.cli import run


# Run in a fresh interpreter per measurement: `python -c CHILD <this file> <function> <json args>`.
CHILD = r"""
import json, runpy, sys, threading, time
import torch, safetensors, lit_lora.files.convert
functions = runpy.run_path(sys.argv[1])  # this script's functions (main does not run)
def status_mb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
peak_anon, done = [0.0], threading.Event()
def sample():
    while not done.is_set():
        peak_anon[0] = max(peak_anon[0], status_mb("RssAnon"))
        time.sleep(0.005)
base, base_anon = status_mb("VmHWM"), status_mb("RssAnon")
sampler = threading.Thread(target=sample, daemon=True)
sampler.start()
functions[sys.argv[2]](*json.loads(sys.argv[3]))
done.set()
sampler.join()
raw = status_mb("VmHWM")
print(json.dumps({"raw": raw, "base": base, "anon": peak_anon[0] - base_anon}))
"""


def make_checkpoints(root: Path, config: Config, dtype: torch.dtype) -> Dict[str, int]:
    """Random weights for `config`, written in the three source formats; returns each one's size in bytes."""
    torch.manual_seed(0)
    hs = config.head_size
    hf_state: Dict[str, torch.Tensor] = {}
    with torch.device("meta"):
        shapes = {name: p.shape for name, p in Llama(config).state_dict().items()}
    for name, shape in shapes.items():
        hf_state[lit_to_hf_name(name)] = (torch.randn(shape) * 0.02).to(dtype)

    hf_config = {**config_to_hf(config), "torch_dtype": str(dtype).removeprefix("torch.")}
    names = list(hf_state)
    halves = {"1": names[: len(names) // 2], "2": names[len(names) // 2:]}  # two shards, like Llama-2-7b-hf
    for kind, single in (("safetensors", "model-0000{}-of-00002.safetensors"), ("bin", "pytorch_model-0000{}-of-00002.bin")):
        directory = root / f"hf-{kind}"
        directory.mkdir()
        (directory / "config.json").write_text(json.dumps(hf_config))
        weight_map = {}
        for part, keys in halves.items():
            shard = {key: hf_state[key] for key in keys}
            if kind == "safetensors":
                save_file(shard, directory / single.format(part), metadata={"format": "pt"})
            else:
                torch.save(shard, directory / single.format(part))
            weight_map.update({key: single.format(part) for key in keys})
        index = "model.safetensors.index.json" if kind == "safetensors" else "pytorch_model.bin.index.json"
        (directory / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

    # Meta's format: interleaved rotary rows (the inverse of meta_to_rotate_half) in 2 tensor-parallel shards.
    meta = root / "meta"
    meta.mkdir()
    (meta / "params.json").write_text(json.dumps({"dim": config.n_embd, "n_layers": config.n_layer, "n_heads": config.n_head,
                                                  "multiple_of": 256, "norm_eps": config.norm_eps, "vocab_size": -1}))
    meta_names = {"tok_embeddings": ("tok_embeddings.weight", 1), "norm": ("norm.weight", None), "lm_head": ("output.weight", 0)}
    layer_names = {"attn_norm": ("attention_norm", None), "attn.q_proj": ("attention.wq", 0), "attn.k_proj": ("attention.wk", 0),
                   "attn.v_proj": ("attention.wv", 0), "attn.o_proj": ("attention.wo", 1), "mlp_norm": ("ffn_norm", None),
                   "mlp.gate_proj": ("feed_forward.w1", 0), "mlp.down_proj": ("feed_forward.w2", 1), "mlp.up_proj": ("feed_forward.w3", 0)}
    shards = [{}, {}]
    for hf_name, tensor in hf_state.items():
        name = hf_to_lit_name(hf_name)
        parts = name.split(".")
        if parts[0] == "layers":
            meta_base, dim = layer_names[".".join(parts[2:-1])]
            meta_name = f"layers.{parts[1]}.{meta_base}.weight"
        else:
            meta_name, dim = meta_names[parts[0]]
        if name.endswith(("q_proj.weight", "k_proj.weight")):  # ours -> Meta: undo the row permutation
            heads = tensor.shape[0] // hs
            tensor = tensor.view(heads, 2, hs // 2, -1).transpose(1, 2).reshape(tensor.shape)
        pieces = [tensor, tensor] if dim is None else tensor.chunk(2, dim=dim)
        for shard, piece in zip(shards, pieces):
            shard[meta_name] = piece.clone()
    for rank, shard in enumerate(shards):
        torch.save(shard, meta / f"consolidated.0{rank}.pth")
    assert torch.equal(meta_to_rotate_half(torch.cat([shards[0]["layers.0.attention.wq.weight"],
                                                      shards[1]["layers.0.attention.wq.weight"]]), config.n_head),
                       hf_state["model.layers.0.self_attn.q_proj.weight"])

    return {name: sum(f.stat().st_size for f in (root / name).iterdir() if f.suffix in (".safetensors", ".bin", ".pth"))
            for name in ("hf-safetensors", "hf-bin", "meta")}


# --- what each subprocess runs -----------------------------------------------------------------------


def lean_hf(source: str, output: str, dtype: Optional[str]) -> None:
    from lit_lora.files.convert import convert_hf_checkpoint
    from lit_lora.files.utils import parse_dtype

    convert_hf_checkpoint(source, output, parse_dtype(dtype))


def lean_meta(source: str, output: str, dtype: Optional[str]) -> None:
    from lit_lora.files.convert import convert_meta_checkpoint
    from lit_lora.files.utils import parse_dtype

    convert_meta_checkpoint(source, output, parse_dtype(dtype))


def lean_export(source: str, output: str, dtype: Optional[str]) -> None:
    from lit_lora.files.convert import convert_lit_checkpoint

    convert_lit_checkpoint(source, output)


def naive_hf(source: str, output: str, dtype: Optional[str]) -> None:
    """The reference: every tensor loaded into one dict (copied out of the files), renamed, saved at once."""
    source_dir = Path(source)
    state: Dict[str, torch.Tensor] = {}
    for file in sorted(source_dir.glob("model-*.safetensors")):
        state.update(load_file(file))
    for file in sorted(source_dir.glob("pytorch_model-*.bin")):
        state.update(torch.load(file, weights_only=True))
    config = config_from_hf(json.loads((source_dir / "config.json").read_text()))
    target = getattr(torch, dtype) if dtype else None
    save_checkpoint(output, {hf_to_lit_name(k): v.to(target) if target else v for k, v in state.items()}, config)


def naive_export(source: str, output: str, dtype: Optional[str]) -> None:
    model = load_checkpoint(source)
    Path(output).mkdir()
    save_file({lit_to_hf_name(k): v for k, v in model.state_dict().items()}, Path(output) / "model.safetensors")


def measure(function: str, *args) -> Dict[str, float]:
    result = subprocess.run([sys.executable, "-c", CHILD, __file__, function, json.dumps(args)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{function}{args} failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(n_layer: int = 8, n_embd: int = 1024, vocab_size: int = 32000, dtype: str = "float16",
         work_dir: Optional[Path] = None) -> None:
    """Measure the converters' peak memory on a random checkpoint of a few hundred MB.

    Args:
        n_layer: layers of the random model (8 with n_embd 1024 and a 32000 vocabulary: ~170M parameters).
        n_embd: embedding size (head size 128, like Llama 2; the MLP width follows Meta's rule).
        vocab_size: vocabulary size.
        dtype: dtype the source checkpoints are stored in (float16, like the Llama 2 releases).
        work_dir: where to write the checkpoints (a temporary directory, removed afterwards, by default).
    """
    config = Config(name="benchmark", n_layer=n_layer, n_embd=n_embd, n_head=n_embd // 128, vocab_size=vocab_size,
                    intermediate_size=meta_intermediate_size(n_embd, 256))
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        root = Path(tmp)
        sizes = make_checkpoints(root, config, getattr(torch, dtype))
        cases = [  # (label, function, source, output, dtype, source size in bytes)
            ("HF safetensors -> lit", "lean_hf", "hf-safetensors", "lit-1", None, sizes["hf-safetensors"]),
            ("  naive reference", "naive_hf", "hf-safetensors", "naive-1", None, sizes["hf-safetensors"]),
            ("HF safetensors -> lit, to bfloat16", "lean_hf", "hf-safetensors", "lit-2", "bfloat16", sizes["hf-safetensors"]),
            ("  naive reference", "naive_hf", "hf-safetensors", "naive-2", "bfloat16", sizes["hf-safetensors"]),
            ("HF .bin -> lit", "lean_hf", "hf-bin", "lit-3", None, sizes["hf-bin"]),
            ("  naive reference", "naive_hf", "hf-bin", "naive-3", None, sizes["hf-bin"]),
            ("Meta 2 shards -> lit", "lean_meta", "meta", "lit-4", None, sizes["meta"]),
            ("lit -> HF (export)", "lean_export", "lit-1", "hf-export", None, sizes["hf-safetensors"]),
            ("  naive reference", "naive_export", "lit-1", "naive-export", None, sizes["hf-safetensors"]),
        ]
        print(f"{config.n_layer} layers, n_embd {config.n_embd}, vocab {config.vocab_size}, {dtype}; "
              f"torch {torch.__version__}; peak RSS in MB, ratios to the checkpoint size\n")
        print(f"{'conversion':36s} {'ckpt':>6s} {'raw':>6s} {'base':>6s} {'net':>6s} {'anon':>6s} {'net/ckpt':>9s} {'anon/ckpt':>9s}")
        lean_net = None
        for label, function, source, output, cast, size in cases:
            mb = size / 2**20
            r = measure(function, str(root / source), str(root / output), cast)
            net = r["raw"] - r["base"]
            versus = ""
            if function.startswith("lean"):
                lean_net = net
            elif lean_net is not None:
                versus = f"   lean / naive (net) = {lean_net / net:.2f}"
            print(f"{label:36s} {mb:6.0f} {r['raw']:6.0f} {r['base']:6.0f} {net:6.0f} {r['anon']:6.0f} "
                  f"{net / mb:9.2f} {r['anon'] / mb:9.2f}{versus}")


if __name__ == "__main__":
    run(main)
