"""What QLoRA needs in memory: Llama 2 in 4 bits, counted on the meta device, and two measurements.

    python benchmarks/qlora_memory.py                                   # weights of 7B, 13B, 70B; LoRA optimizer
    python benchmarks/qlora_memory.py --activations true                # + activations of 7B by sequence length
    python benchmarks/qlora_memory.py --measure_load true               # + peak RSS of loading a ~310 MB checkpoint

1. Weights. Each model is built on the meta device (no memory, no compute) in bf16, its projections
   swapped for `Linear4bit` shells by `quantize_model` (lm_head and the embedding stay bf16), and the
   bytes of every tensor are added up by role (`lit_lora.speed.quantize.quantized_storage`): 4-bit codes,
   absmax scales (nf4) or their 8-bit codes + second-level scales (nf4-dq), and the 16-bit rest.
   LoRA's trainable parameters cost 16 bytes each in training: fp32 weight, fp32 gradient and AdamW's
   two fp32 moments.
2. Activations (--activations). A 1-layer and a 2-layer model of the chosen size's width run one
   forward pass on the CPU with uninitialised (zeroed) 4-bit weights and LoRA, and every tensor autograd
   saves for the backward pass is counted (each storage once, parameters and buffers excluded). The
   difference is one layer; both grow linearly in the number of tokens (PyTorch's fused attention
   saves no T x T matrix), so the totals for any sequence length follow. bf16, no activation
   checkpointing; with checkpointing only each block's input (2 C bytes per token) stays.
3. Loading (--measure_load). A random Llama-2-architecture checkpoint (bf16, ~310 MB) is written to
   a temporary directory and loaded by `load_checkpoint` (bf16) and by `load_checkpoint_quantized` (nf4-dq),
   each in a fresh interpreter that resets its peak-RSS counter after the imports (/proc/self/clear_refs),
   loads, reads every weight once (safetensors maps files lazily: an untouched bf16 weight is not yet in
   memory) and reports VmHWM - VmRSS-before: the memory loading and holding the model took.
"""

import json
import subprocess
import sys
import tempfile
from typing import Dict, Tuple

import torch
import torch.nn.functional as F

from lit_lora.files.checkpoint import save_checkpoint
from lit_lora.lora import LoRAConfig, add_lora, mark_only_lora_as_trainable
from lit_lora.model import Config, Llama
from lit_lora.nf4 import NF4_MODES
from lit_lora.speed.quantize import bits_per_parameter, quantize_model, quantized_storage
from lit_lora.workflows.cli import run


GB = 1e9

# Run in a fresh interpreter: `python -c LOAD_CHILD <loader> <checkpoint_dir>`; prints the MB the load added.
LOAD_CHILD = r"""
import json, sys, torch
from lit_lora.files.checkpoint import load_checkpoint
from lit_lora.model import Config, Llama
from lit_lora.speed.quantize import load_checkpoint_quantized, quantize_model, quantized_storage
def status_mb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
# Warm up: the first model PyTorch builds, whatever its size, initialises ~70 MB of kernels and tables.
with torch.device("meta"):
    warmup = Llama(Config.from_name("tiny"))
warmup.to_empty(device="cpu")
with torch.no_grad():
    for param in warmup.parameters():
        param.zero_()
quantize_model(warmup)
open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS: the imports do not count
before = status_mb("VmRSS")
if sys.argv[1] == "bf16":
    model = load_checkpoint(sys.argv[2], dtype=torch.bfloat16)
else:
    model = load_checkpoint_quantized(sys.argv[2], mode="nf4-dq", dtype=torch.bfloat16)
for tensor in model.state_dict().values():  # safetensors maps the file lazily: read every byte, as training would
    tensor.sum()
print(json.dumps({"peak_mb": status_mb("VmHWM") - before, "model_mb": quantized_storage(model)["total"] / 2**20}))
"""


def weight_storage(name: str, mode: str) -> Dict[str, int]:
    """Bytes by role of Llama 2 `name` with its projections in `mode` and the rest in bf16 (meta device)."""
    with torch.device("meta"):
        model = Llama(Config.from_name(name)).to(torch.bfloat16)
    quantize_model(model, mode)
    return quantized_storage(model)


def lora_trainable(name: str, lora_config: LoRAConfig) -> int:
    with torch.device("meta"):
        model = Llama(Config.from_name(name))
    add_lora(model, lora_config)
    trainable, _ = mark_only_lora_as_trainable(model)
    return trainable


def saved_activation_bytes(config: Config, lora_config: LoRAConfig, tokens: int) -> int:
    """Bytes autograd keeps for backward in one forward pass of (1, tokens) through a QLoRA model."""
    with torch.device("meta"):
        model = Llama(config).to(torch.bfloat16)
    quantize_model(model, "nf4-dq")
    model.to_empty(device="cpu")  # memory without initialisation: only the shapes of what is saved matter
    with torch.no_grad():
        for tensor in list(model.parameters()) + list(model.buffers()):
            tensor.zero_()
    add_lora(model, lora_config)
    mark_only_lora_as_trainable(model)
    held = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    saved: Dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in held:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    idx = torch.zeros(1, tokens, dtype=torch.long)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        logits = model(idx)  # (1, T, V)
        targets = idx[:, 1:].reshape(-1)
        F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(), targets)  # the loss of lit_lora.train
    return sum(saved.values())


def measure_loading(n_layer: int) -> Dict[str, float]:
    """Write a random bf16 checkpoint and measure both loaders. Width 1024 with 7B's MLP ratio and a
    4096-token vocabulary, so that the embedding and head (kept in bf16) are ~5 % of the weights, as in 7B."""
    config = Config(name="bench", block_size=512, vocab_size=4096, n_layer=n_layer, n_head=16, n_embd=1024,
                    intermediate_size=2816)
    with torch.device("meta"):
        shapes = {name: p.shape for name, p in Llama(config).state_dict().items()}
    torch.manual_seed(0)
    state = {name: (torch.randn(shape) * 0.02).to(torch.bfloat16) for name, shape in shapes.items()}
    results = {"checkpoint_mb": sum(t.numel() * t.element_size() for t in state.values()) / 2**20}
    with tempfile.TemporaryDirectory() as directory:
        save_checkpoint(directory, state, config)
        del state
        for loader in ("bf16", "nf4-dq"):
            output = subprocess.run([sys.executable, "-c", LOAD_CHILD, loader, directory], capture_output=True,
                                    text=True)
            if output.returncode:
                raise RuntimeError(f"the {loader} load failed:\n{output.stderr}")
            measured = json.loads(output.stdout.strip().splitlines()[-1])
            results[f"{loader}_peak_mb"], results[f"{loader}_model_mb"] = measured["peak_mb"], measured["model_mb"]
    return results


def report_weights(name: str, lora_config: LoRAConfig) -> Dict[str, float]:
    storage = {mode: weight_storage(name, mode) for mode in NF4_MODES}
    nf4, dq = storage["nf4"], storage["nf4-dq"]
    rest, quantized = nf4["unquantized"], nf4["quantized_params"]
    bf16 = 2 * quantized + rest
    trainable = lora_trainable(name, lora_config)
    print(f"\n{name}: {(quantized + rest / 2) / 1e9:.2f} B parameters, {quantized / 1e9:.2f} B of them in the quantized projections")
    print(f"  bf16     {bf16 / GB:6.2f} GB")
    print(f"  nf4      {nf4['total'] / GB:6.2f} GB = codes {nf4['codes'] / GB:.3f} + absmax {nf4['absmax'] / GB:.3f}"
          f" + 16-bit rest {rest / GB:.3f}   ({nf4['total'] / bf16:.3f} x bf16; "
          f"{bits_per_parameter('nf4'):.3f} bits per quantized weight)")
    print(f"  nf4-dq   {dq['total'] / GB:6.2f} GB = codes {dq['codes'] / GB:.3f} + absmax codes {dq['absmax_codes'] / GB:.3f}"
          f" + scales {dq['absmax_scales'] / GB:.4f} + 16-bit rest {rest / GB:.3f}   ({dq['total'] / bf16:.3f} x bf16; "
          f"{bits_per_parameter('nf4-dq'):.3f} bits per quantized weight)")
    print(f"  double quantization saves {(nf4['total'] - dq['total']) / GB:.3f} GB")
    print(f"  LoRA r={lora_config.r} on {','.join(lora_config.targets)}: {trainable / 1e6:.2f} M trainable parameters "
          f"x 16 bytes (fp32 weight, gradient, AdamW m and v) = {16 * trainable / GB:.3f} GB")
    return {"bf16": bf16 / GB, "nf4": nf4["total"] / GB, "nf4-dq": dq["total"] / GB, "rest": rest / GB,
            "lora_trainable": trainable, "lora_training": 16 * trainable / GB}


def report_activations(name: str, lora_config: LoRAConfig, seq_lengths: Tuple[int, ...], tokens: int = 64) -> Dict[str, float]:
    config = Config.from_name(name)
    one, two = (saved_activation_bytes(Config.from_name(name, n_layer=n), lora_config, tokens) for n in (1, 2))
    per_layer = (two - one) / tokens  # bytes per token of one block
    rest = (2 * one - two) / tokens  # bytes per token outside the blocks: embedding, head, loss
    print(f"\nActivations saved for backward, {name}, LoRA r={lora_config.r} on {','.join(lora_config.targets)}, bf16, "
          f"batch 1 (measured on CPU at {tokens} tokens):")
    print(f"  {per_layer / 2**10:.0f} KiB per token per layer x {config.n_layer} layers + {rest / 2**10:.0f} KiB per token "
          "(embedding, head, loss)")
    figures = {"per_token_per_layer": per_layer, "per_token_rest": rest}
    for length in seq_lengths:
        total = length * (per_layer * config.n_layer + rest)
        checkpointed = length * (2 * config.n_embd * config.n_layer + per_layer + rest)  # block inputs + one block
        figures[f"T={length}"] = total / GB
        print(f"  T={length:5d}: {total / GB:6.2f} GB   with activation checkpointing ~{checkpointed / GB:.2f} GB")
    return figures


def report_loading(n_layer: int) -> Dict[str, float]:
    results = measure_loading(n_layer)
    print(f"\nPeak RSS added by loading a {results['checkpoint_mb']:.0f} MB bf16 checkpoint and reading every weight "
          "(MB = 2^20 bytes):")
    print(f"  load_checkpoint (bf16):              +{results['bf16_peak_mb']:.0f} MB for a {results['bf16_model_mb']:.0f} MB model")
    print(f"  load_checkpoint_quantized (nf4-dq):  +{results['nf4-dq_peak_mb']:.0f} MB for a {results['nf4-dq_model_mb']:.0f} MB "
          f"model ({results['nf4-dq_peak_mb'] / results['checkpoint_mb']:.2f} x the checkpoint, "
          f"{results['nf4-dq_peak_mb'] / results['bf16_peak_mb']:.2f} x the bf16 load)")
    return results


def main(sizes: Tuple[str, ...] = ("7B", "13B", "70B"), lora_r: int = 8, lora_targets: Tuple[str, ...] = ("q", "v"),
         activations: bool = False, activation_size: str = "7B",
         seq_lengths: Tuple[int, ...] = (256, 512, 1024, 2048, 4096), measure_load: bool = False,
         load_layers: int = 12) -> Dict[str, Dict[str, float]]:
    """Print the memory QLoRA needs; returns the figures printed (GB = 1e9 bytes, MB = 2^20 bytes).

    Args:
        sizes: Llama 2 presets to count on the meta device (7B, 13B, 70B, TinyLlama-1.1B, ...).
        lora_r: LoRA rank for the trainable-parameter count.
        lora_targets: LoRA targets (q, k, v, o, gate, up, down, head, mlp, all).
        activations: also measure saved activations by sequence length (one CPU forward pass of a
            1-layer and a 2-layer model of `activation_size`'s width; ~2.5 GB of RAM and ~40 s for 7B).
        activation_size: the preset whose activations are measured.
        seq_lengths: sequence lengths (batch size 1) to print activations for.
        measure_load: also write a random checkpoint and measure the peak RSS of loading it in bf16
            and straight into 4 bits (two subprocesses, ~1 GB of RAM, ~30 s).
        load_layers: layers of that checkpoint (12 layers of width 1024: ~310 MB).
    """
    lora_config = LoRAConfig(r=lora_r, targets=lora_targets)
    print("Llama 2 weights, counted from tensor sizes on the meta device (GB = 1e9 bytes). The projections are")
    print("quantized; the token embedding, norms and lm_head stay bf16 ('16-bit rest').")
    figures = {name: report_weights(name, lora_config) for name in sizes}
    if activations:
        figures["activations"] = report_activations(activation_size, lora_config, seq_lengths)
    if measure_load:
        figures["load"] = report_loading(load_layers)
    return figures


if __name__ == "__main__":
    run(main)
