"""The GPU promise, measured in one short run: Llama-2-7B finetuning memory and speed, decoding speed, and
greedy parity with transformers, with random weights in the real shapes (nothing is downloaded).

    python benchmarks/gpu_check.py                       # on a CUDA GPU: every row, in a few minutes
    python benchmarks/gpu_check.py --tiny true           # every row on the tiny config (CPU or GPU), seconds

Finetuning rows (micro-batch 4 x 512, bf16-true, AdamW; the model built on the meta device and
materialised on the GPU, quantized layer by layer for QLoRA): peak allocated and reserved CUDA memory,
tokens/s and MFU (training FLOPs per token x tokens/s / the bf16 matmul peak measured on this GPU), for
LoRA q,v r=8 (the Lit-LLaMA recipe; with and without activation checkpointing, eager and compiled),
LLaMA-Adapter, LoRA on every linear layer at r=64, QLoRA nf4-dq, DoRA, and full finetuning of a 1.1B
TinyLlama shape. Decoding rows: tokens/s at batch 1 and 8 in bf16, eager and compiled, against the
memory-bandwidth limit (weight bytes per token / the copy bandwidth measured on this device). Last,
greedy tokens against transformers' `generate` on a small model on the same device.

Every row runs the project's own code (the method registry, `train.train_step`, `generate`) for a few
steps within a time box; a row that fails or misses its target says so in the table. The table is
printed and written as JSON (`--out`) after every row, so a run stopped half-way keeps what it measured.
"""

import gc
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch

from lit_lora.files.checkpoint import atomic_path
from lit_lora.files.utils import count_parameters
from lit_lora.model import Config, Llama
from lit_lora.workflows.cli import run


TARGETS = {"lora_mem_24gb": 24e9, "qlora_mem_10gb": 10e9, "lora_mfu": 0.40}


@dataclass
class Row:
    name: str
    values: Dict[str, Any] = field(default_factory=dict)
    verdict: str = ""


def device_and_sync(tiny: bool):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not tiny:
        raise ValueError("no CUDA GPU here: run with --tiny true to exercise every row on the CPU")
    return device, (torch.cuda.synchronize if device.type == "cuda" else (lambda: None))


def matmul_peak(device: torch.device, dtype: torch.dtype, size: int, sync: Callable[[], None]) -> float:
    """The best FLOP/s of a few size^3 matrix products: the peak that MFU is measured against."""
    a, b = torch.randn(size, size, device=device, dtype=dtype), torch.randn(size, size, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(5):
        sync()
        start = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def copy_bandwidth(device: torch.device, n_bytes: int, sync: Callable[[], None]) -> float:
    """Bytes per second read and written by a large device-to-device copy (each byte is read once)."""
    source = torch.empty(n_bytes // 2, dtype=torch.bfloat16, device=device)
    target = torch.empty_like(source)
    best = float("inf")
    for _ in range(5):
        sync()
        start = time.perf_counter()
        target.copy_(source)
        sync()
        best = min(best, time.perf_counter() - start)
    return 2 * n_bytes / best


def build(config: Config, device: torch.device, dtype: torch.dtype, quantize: Optional[str] = None) -> Llama:
    """A Llama of `config` with random N(0, 0.02) weights on `device`, built on the meta device; with
    `quantize`, its linear layers are quantized one at a time (the 16-bit model never exists)."""
    from lit_lora.speed.quantize import quantize_model

    with torch.device("meta"):
        model = Llama(config).to(dtype)
    if quantize is not None:
        quantize_model(model, quantize)
    model.to_empty(device=device)
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "load_weight"):
                module.load_weight(torch.randn(module.out_features, module.in_features, device=device, dtype=dtype) * 0.02)
            else:
                for name, param in module.named_parameters(recurse=False):
                    param.normal_(0.0, 0.02) if param.dim() > 1 else param.fill_(1.0)
    if config.tie_embeddings:
        model.lm_head.weight = model.tok_embeddings.weight
    return model


def training_flops_per_token(model: Llama, seq_len: int) -> float:
    """4 N_frozen + 6 N_trainable for the matrices a token passes (forward 2, input gradient 2, weight
    gradient 2), plus the attention products, 3 x 2 x 2 x C x (T + 1) / 2 per layer."""
    frozen = trainable = 0
    for name, param in model.named_parameters():
        if param.dim() < 2 or name.startswith("tok_embeddings"):
            continue
        if param.requires_grad:
            trainable += param.numel()
        else:
            frozen += param.numel()
    for module in model.modules():  # quantized layers hold their weights in buffers
        if hasattr(module, "load_weight"):
            frozen += module.in_features * module.out_features
    attention = 3 * 2 * 2 * model.config.n_embd * (seq_len + 1) / 2 * model.config.n_layer
    return 4 * frozen + 6 * trainable + attention


def finetune_row(name: str, config: Config, method: str, settings: Any, device: torch.device, sync, peak: float,
                 batch: int, seq_len: int, steps: int, quantize: Optional[str] = None, checkpointing: bool = False,
                 compile: bool = False, compile_backend: str = "inductor", row_seconds: float = 60.0) -> Row:
    """A few optimizer steps exactly as `fit` takes them (the registry's method, `train_step`)."""
    from lit_lora.data import BatchSampler
    from lit_lora.methods import get_method
    from lit_lora.train import Loop, TrainArgs, parameter_groups, setup_fabric, train_step

    row = Row(name)
    gc.collect()  # the previous row's model, optimizer and compiled graphs must not count here
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build(config, device, dtype, quantize)
    found = get_method(method)
    if found.add is not None:
        found.add(model, settings)
    found.mark_trainable(model)
    model.activation_checkpointing = checkpointing
    trainable, total = count_parameters(model)
    flops = training_flops_per_token(model, seq_len)
    fabric = setup_fabric(Path("out/gpu_check"), "bf16-true" if device.type == "cuda" else "32-true",
                          accelerator=device.type)
    forward = torch.compile(model, backend=compile_backend) if compile else model
    wrapped = fabric.setup_module(forward)
    optimizer = fabric.setup_optimizers(torch.optim.AdamW(parameter_groups(wrapped, lambda n: 1.0), lr=1e-4))
    args = TrainArgs(micro_batch_size=batch, global_batch_size=batch, grad_clip=1.0)
    rows = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, config.vocab_size, (batch, seq_len))]
    sampler = BatchSampler([seq_len] * batch, batch, shuffle=False, seed=0)
    loop = Loop(fabric, wrapped, optimizer, sampler, args, Path("out/gpu_check"), {}, {"step": 0, "history": []},
                compiled=compile)
    started = time.perf_counter()
    train_step(loop, rows, [list(range(batch))], 1e-4)  # warm-up (and compiling)
    sync()
    row.values["first step s"] = round(time.perf_counter() - started, 1)
    if time.perf_counter() - started > row_seconds:  # the time box: no timed steps after so slow a first one
        row.verdict = f"first step over the row's {row_seconds:.0f} s: no timed steps"
        return row
    started = time.perf_counter()
    for _ in range(steps):
        train_step(loop, rows, [list(range(batch))], 1e-4)
    sync()
    seconds = (time.perf_counter() - started) / steps
    tokens_per_second = batch * seq_len / seconds
    row.values.update({"trainable": trainable, "total": total, "tokens/s": round(tokens_per_second),
                       "MFU": round(tokens_per_second * flops / peak, 3)})
    if device.type == "cuda":
        row.values["peak allocated GB"] = round(torch.cuda.max_memory_allocated(device) / 1e9, 2)
        row.values["peak reserved GB"] = round(torch.cuda.max_memory_reserved(device) / 1e9, 2)
    del loop, wrapped, optimizer, model
    return row


def decode_row(name: str, config: Config, device: torch.device, sync, bandwidth: float, batch: int, new_tokens: int,
               compile: bool, compile_backend: str) -> Row:
    from lit_lora.generate import generate
    from lit_lora.speed.decoding import CompiledDecoding

    row = Row(name)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build(config, device, dtype).eval()
    prompt = torch.randint(0, config.vocab_size, (batch, 16), device=device)
    runner = CompiledDecoding(model, backend=compile_backend) if compile else model
    cache_length = 16 + new_tokens  # the warm-up compiles for the timed call's cache length
    generate(runner, prompt, 4, temperature=0.0, cache_length=cache_length)  # warm-up (and compiling)
    sync()
    started = time.perf_counter()
    generate(runner, prompt, new_tokens, temperature=0.0, cache_length=cache_length)
    sync()
    tokens_per_second = batch * new_tokens / (time.perf_counter() - started)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    limit = batch * bandwidth / weight_bytes  # every token step reads every weight once
    row.values.update({"tokens/s": round(tokens_per_second, 1), "limit tokens/s": round(limit, 1),
                       "of limit": round(tokens_per_second / limit, 3)})
    return row


def parity_row(device: torch.device) -> Row:
    """Greedy tokens of lit-lora's `generate` and transformers' `generate` on the same small random model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lit_lora.files.hf_names import config_from_hf, hf_to_lit_name
    from lit_lora.generate import generate

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=344, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)).to(device).eval()
    ours = Llama(config_from_hf(hf.config.to_dict()))
    ours.load_state_dict({hf_to_lit_name(k): v for k, v in hf.state_dict().items()})
    ours = ours.to(device).eval()
    prompt = torch.randint(0, 512, (1, 8), device=device)
    theirs = hf.generate(prompt, max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0)[0]
    mine = generate(ours, prompt[0], 32, temperature=0.0)
    same = int((mine == theirs).cumprod(0).sum()) - prompt.size(1)
    return Row("greedy parity with transformers (4 layers, 32 tokens)", {"same tokens": f"{same}/32"},
               "met" if same == 32 else "NOT met")


def verdicts(rows: List[Row]) -> None:
    for row in rows:
        v = row.values
        if row.name.startswith("7B LoRA q,v r=8") and "peak allocated GB" in v:
            fits = v["peak allocated GB"] * 1e9 <= TARGETS["lora_mem_24gb"]
            fast = v["MFU"] >= TARGETS["lora_mfu"]
            row.verdict = f"fits 24 GB: {'met' if fits else 'NOT met'}; MFU >= 40 %: {'met' if fast else 'NOT met'}"
        elif row.name.startswith("7B QLoRA") and "peak allocated GB" in v:
            row.verdict = f"fits 10 GB: {'met' if v['peak allocated GB'] * 1e9 <= TARGETS['qlora_mem_10gb'] else 'NOT met'}"


def table(rows: List[Row]) -> str:
    lines = []
    for row in rows:
        cells = ", ".join(f"{key} {value}" for key, value in row.values.items())
        lines.append(f"{row.name:58} {cells}" + (f"  [{row.verdict}]" if row.verdict else ""))
    return "\n".join(lines)


def main(tiny: bool = False, out: Path = Path("out/gpu_check.json"), row_seconds: float = 60.0,
         total_seconds: float = 330.0) -> List[Dict[str, Any]]:
    """Measure every row (see the module docstring) and print the table; returns the rows.

    Args:
        tiny: every row on the tiny config (vocabulary 32k, 2 layers), micro-batch 2 x 64: seconds on a CPU.
        out: the JSON file written after every row.
        row_seconds: a finetuning row whose first step took longer skips its timed steps (reported as such).
        total_seconds: rows not started by then are skipped (reported as such).
    """
    from lit_lora.adapter import AdapterConfig
    from lit_lora.lora import LoRAConfig

    device, sync = device_and_sync(tiny)
    logging.getLogger("torch._dynamo").setLevel(logging.ERROR)  # the expected graph break at the KV cache's fill
    seven_b, one_b = (Config.from_name("tiny"), Config.from_name("tiny")) if tiny else \
        (Config.from_name("7B"), Config.from_name("TinyLlama-1.1B"))
    batch, seq_len, steps = (2, 64, 2) if tiny else (4, 512, 5)
    backend = "eager" if tiny else "inductor"  # tiny: trace the compiled path without generating kernels
    peak = matmul_peak(device, torch.bfloat16 if device.type == "cuda" else torch.float32, 8192 if device.type == "cuda" else 512, sync)
    bandwidth = copy_bandwidth(device, (1 << 30) if device.type == "cuda" else (1 << 26), sync)
    header = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "torch": torch.__version__,
              "matmul peak TFLOP/s": round(peak / 1e12, 1), "copy bandwidth GB/s": round(bandwidth / 1e9, 1)}
    print(", ".join(f"{k} {v}" for k, v in header.items()))
    big, small = ("tiny", "tiny") if tiny else ("7B", "1.1B")
    lora_qv = LoRAConfig(r=8, alpha=16, dropout=0.05, targets=("q", "v"))
    plan = [
        (f"{big} LoRA q,v r=8", dict(method="lora", settings=lora_qv)),
        (f"{big} LoRA q,v r=8, activation checkpointing", dict(method="lora", settings=lora_qv, checkpointing=True)),
        (f"{big} LoRA q,v r=8, compiled", dict(method="lora", settings=lora_qv, compile=True)),
        (f"{big} LLaMA-Adapter (10 prompts)", dict(method="adapter", settings=AdapterConfig(start_layer=1 if tiny else 2))),
        (f"{big} LoRA all linear r=64", dict(method="lora", settings=LoRAConfig(r=64, alpha=128, targets=("q", "k", "v", "o", "mlp")))),
        (f"{big} QLoRA nf4-dq, LoRA q,v r=8", dict(method="lora", settings=lora_qv, quantize="nf4-dq")),
        (f"{big} DoRA q,v r=8", dict(method="lora", settings=LoRAConfig(r=8, alpha=16, targets=("q", "v"), use_dora=True))),
        (f"{small} full finetuning", dict(method="full", settings=None, config=one_b)),
    ]
    rows: List[Row] = []
    started = time.perf_counter()

    def record(row: Row) -> None:
        rows.append(row)
        verdicts(rows)
        print(table([row]), flush=True)
        with atomic_path(out) as tmp:
            tmp.write_text(json.dumps({**header, "rows": [vars(r) for r in rows]}, indent=2) + "\n")

    try:
        for name, spec in plan:
            if time.perf_counter() - started > total_seconds:
                record(Row(name, {}, "skipped: the run's time box is spent"))
                continue
            spec = dict(spec)
            config = spec.pop("config", seven_b)
            try:
                record(finetune_row(name, config, device=device, sync=sync, peak=peak, batch=batch, seq_len=seq_len,
                                    steps=steps, compile_backend=backend, row_seconds=row_seconds, **spec))
            except torch.cuda.OutOfMemoryError:
                record(Row(name, {}, "out of memory"))
            except Exception as error:  # a row that fails says so; the others still run
                record(Row(name, {}, f"failed: {type(error).__name__}: {str(error).splitlines()[0][:120] if str(error) else ''}"))
        for batch_size in (1, 8):
            for compile in (False, True):
                name = f"{big} decoding, batch {batch_size}, {'compiled' if compile else 'eager'}"
                try:
                    record(decode_row(name, seven_b, device, sync, bandwidth, batch_size, 8 if tiny else 64, compile, backend))
                except Exception as error:
                    record(Row(name, {}, f"failed: {type(error).__name__}: {str(error).splitlines()[0][:120] if str(error) else ''}"))
        record(parity_row(device))
    except KeyboardInterrupt:
        print("stopped: the rows above are in", out)
    print(f"\n{table(rows)}\n(all rows in {out}; {time.perf_counter() - started:.0f} s)")
    return [vars(row) for row in rows]


if __name__ == "__main__":
    run(main)
