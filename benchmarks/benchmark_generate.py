"""Decoding speed of lit_lora.generate next to transformers and llama.cpp, same weights, same machine, one run.

    python benchmarks/benchmark_generate.py                              # the 60M model, 3 rounds
    python benchmarks/benchmark_generate.py --rounds 5 --threads 2 --llama_cpp_dir ~/llama.cpp

A random Llama of the 60M shape (stories42M with an untied head: vocab 32000, C 512, 8 layers, 8 heads,
MLP 1376) is built once and copied into a transformers LlamaForCausalLM with the same weights (and, with
llama.cpp, converted to GGUF: f32, bf16 and q8_0 by llama.cpp's own convert_hf_to_gguf.py). Every round
then runs each engine back to back: greedy, a 16-token prompt, 128 new tokens, EOS ignored.

  transformers        `generate()` in float32 and bf16
  lit-lora            `generate()` eagerly, and through `CompiledDecoding` (what `generate/*.py --compile`
                      runs: the one-token step compiled with fixed shapes), in float32, bf16 (where the
                      CPU has native bf16) and int8 weights (`--quantize int8`; bf16 activations, or on
                      a CPU without native bf16 float32 ones); and eagerly with QLoRA's 4-bit NF4
                      weights (`--quantize nf4`, head in bf16)
  llama.cpp           `llama-bench -p 16 -n 128` with as many threads, when --llama_cpp_dir (or
                      $LLAMA_CPP_DIR) holds its converter and build/bin/llama-bench

Reported per engine: decode tokens/s (after the first token) as the median over rounds; the ratio to
transformers float32 (median of per-round ratios: a shared machine shifts both alike); the share of the
bandwidth limit = tokens/s x the weight bytes read per token / the read bandwidth measured in this run
(the sum of 1 GiB of float32, more than any cache, on every thread); prefill speed (prompt tokens per
second of the time to the first token); and, for the engines whose tokens are not float32's, how many
greedy tokens they share with float32 before the first difference and, teacher-forced on the float32
answer, at how many of its positions their most likely next token is float32's. Then batches: tokens/s
(all rows together) of bf16 `generate` with 1, 4 and 16 prompts at once (`generate` with a list of
prompts: left padding, each row on its own positions), against batch 1. The float32 tokens of lit-lora
(eager and compiled) must equal transformers'; a mismatch fails the run.
"""

import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from lit_lora.files.hf_names import config_to_hf, lit_to_hf_name
from lit_lora.generate import generate
from lit_lora.model import Config, Llama
from lit_lora.nf4 import Linear4bit
from lit_lora.speed.decoding import CompiledDecoding, cpu_supports_fast_bf16
from lit_lora.speed.int8 import Int8Linear
from lit_lora.speed.quantize import bits_per_parameter, quantize_model
from lit_lora.workflows.cli import run


SHARED_TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "data" / "llama2-tokenizer" / "tokenizer.model"


def build_pair(device: torch.device):
    """The 60M lit-lora Llama (random) and a transformers LlamaForCausalLM holding the same float32 weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = Config.from_name("stories42M", vocab_size=32000, tie_embeddings=False)
    torch.manual_seed(0)
    ours = Llama(config).eval()
    with torch.no_grad():  # a larger head than the training init: confident, varied greedy tokens
        ours.lm_head.weight.normal_(0.0, 0.5)
    hf = LlamaForCausalLM(LlamaConfig(**config_to_hf(config))).eval()
    hf.load_state_dict({lit_to_hf_name(k): v for k, v in ours.state_dict().items()})
    hf.generation_config.eos_token_id = None  # never stop early: every run decodes all new tokens
    hf.generation_config.pad_token_id = 0
    return ours.to(device), hf.to(device)


def weight_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes of the matrices one decoded token reads: every linear layer's weights (the embedding is one row)."""
    total = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            total += module.weight.numel() * module.weight.element_size()
        elif isinstance(module, Int8Linear):
            total += module.weight_int8.numel() + module.scale.numel() * module.scale.element_size()
    return total


def read_bandwidth(device: torch.device, repeats: int = 5) -> float:
    """GB/s of summing 1 GiB of float32 (best of `repeats`): the memory read bandwidth, every thread
    streaming. (A float32 matrix-vector product over the same bytes reads at about half of it on a CPU,
    so engines that stream well exceeded a limit measured that way.)"""
    data = torch.randn(1 << 28, device=device)  # 1 GiB
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        data.sum().item()
        best = min(best, time.perf_counter() - start)
    return data.numel() * 4 / best / 1e9


def timed_ours(model, prompts, new_tokens: int, cache_length: Optional[int] = None) -> Dict[str, object]:
    """One generate() call on a (1, T) prompt, or on a list of prompts (a batch)."""
    stamps: List[float] = []
    start = time.perf_counter()
    output = generate(model, prompts if isinstance(prompts, list) else prompts[0], new_tokens, temperature=0.0,
                      on_token=lambda ids: stamps.append(time.perf_counter()), cache_length=cache_length)
    rows = len(prompts) if isinstance(prompts, list) else 1
    tokens = None if isinstance(prompts, list) else output[prompts.size(1):].cpu()
    return {"tokens": tokens, "tokens_per_second": rows * (len(stamps) - 1) / (stamps[-1] - stamps[0]),
            "prefill_tokens_per_second": rows * (len(prompts[0]) if isinstance(prompts, list) else prompts.size(1))
            / (stamps[0] - start)}


def timed_transformers(model, prompt: torch.Tensor, new_tokens: int) -> Dict[str, object]:
    from transformers.generation.streamers import BaseStreamer

    stamps: List[float] = []

    class Clock(BaseStreamer):  # transformers calls put() with the prompt, then once per new token
        def put(self, value):
            stamps.append(time.perf_counter())

        def end(self):
            pass

    start = time.perf_counter()
    with torch.inference_mode():
        output = model.generate(prompt, max_new_tokens=new_tokens, do_sample=False, streamer=Clock(),
                                attention_mask=torch.ones_like(prompt))
    new = stamps[1:]  # drop the prompt's put()
    return {"tokens": output[0, prompt.size(1):].cpu(), "tokens_per_second": (len(new) - 1) / (new[-1] - new[0]),
            "prefill_tokens_per_second": prompt.size(1) / (new[0] - start)}


class LlamaCpp:
    """llama.cpp's llama-bench on GGUF conversions of the same weights (f32, bf16, q8_0)."""

    def __init__(self, llama_cpp_dir: Path, hf_model, tokenizer: Path, workdir: Path, threads: int) -> None:
        self.bench, self.threads = llama_cpp_dir / "build" / "bin" / "llama-bench", threads
        hf_dir = workdir / "hf"
        hf_model.save_pretrained(hf_dir)
        (hf_dir / "tokenizer.model").write_bytes(tokenizer.read_bytes())
        self.files: Dict[str, Path] = {}
        for kind in ("f32", "bf16", "q8_0"):
            path = workdir / f"model-{kind}.gguf"
            done = subprocess.run([sys.executable, str(llama_cpp_dir / "convert_hf_to_gguf.py"), str(hf_dir), "--outtype",
                                   kind, "--outfile", str(path)], capture_output=True, text=True)
            if done.returncode == 0:
                self.files[kind] = path
            else:
                print(f"llama.cpp: converting to {kind} failed: {done.stderr.strip().splitlines()[-1:]}")

    def engines(self, prompt_length: int, new_tokens: int) -> Dict[str, Callable[[torch.Tensor], Dict[str, object]]]:
        return {f"llama.cpp {kind}": (lambda p, path=path: self.run(path, prompt_length, new_tokens))
                for kind, path in self.files.items()}

    def run(self, path: Path, prompt_length: int, new_tokens: int) -> Dict[str, object]:
        done = subprocess.run([str(self.bench), "-m", str(path), "-p", str(prompt_length), "-n", str(new_tokens),
                               "-t", str(self.threads), "-r", "1", "-o", "json"], capture_output=True, text=True)
        if done.returncode != 0:  # e.g. an instruction this CPU lacks in a -DGGML_NATIVE build
            return {"tokens": None, "tokens_per_second": float("nan"), "prefill_tokens_per_second": float("nan"),
                    "failed": f"exit code {done.returncode}"}
        rows = json.loads(done.stdout)
        speed = {("prefill" if row["n_prompt"] else "decode"): row["avg_ts"] for row in rows}
        return {"tokens": None, "tokens_per_second": speed["decode"], "prefill_tokens_per_second": speed["prefill"]}


LLAMA_CPP_BYTES_PER_WEIGHT = {"f32": 4.0, "bf16": 2.0, "q8_0": 34 / 32}  # q8_0: 32 int8 + one fp16 scale per block


def main(
    rounds: int = 3,
    prompt_length: int = 16,
    new_tokens: int = 128,
    threads: Optional[int] = None,
    device: str = "cpu",
    bf16: Optional[bool] = None,
    compile: bool = True,
    batch_sizes: List[int] = [1, 4, 16],
    llama_cpp_dir: Optional[Path] = None,
    tokenizer: Path = SHARED_TOKENIZER,
) -> Dict[str, float]:
    """Benchmark decoding against transformers and llama.cpp; prints tables and returns the medians.

    Args:
        rounds: how many times every engine runs; medians are reported.
        prompt_length: tokens in the (random) prompt.
        new_tokens: tokens generated per run.
        threads: CPU threads for every engine (default: torch's choice).
        device: cpu or cuda.
        bf16: also run bf16 and NF4, and int8 in bf16 (default: on a GPU with bf16, or a CPU with
            AVX512-BF16/AMX); without it int8 runs in float32 on a CPU.
        compile: also run lit-lora through `CompiledDecoding` (compiled during the warm-up, not timed).
        batch_sizes: prompts generated at once in the batch table (bf16, or float32 without bf16).
        llama_cpp_dir: a llama.cpp tree with convert_hf_to_gguf.py and build/bin/llama-bench (default
            $LLAMA_CPP_DIR); without it llama.cpp is left out.
        tokenizer: the SentencePiece model the GGUF conversion needs (any 32k Llama tokenizer).
    """
    if threads is not None:
        torch.set_num_threads(threads)
    # one compiled decoding step per model and batch shape, all kept (generate/*.py compile one at a time)
    torch._dynamo.config.recompile_limit = 64
    chosen = torch.device(device)
    if bf16 is None:
        bf16 = torch.cuda.is_bf16_supported() if chosen.type == "cuda" else cpu_supports_fast_bf16()
    llama_cpp_dir = llama_cpp_dir or (Path(os.environ["LLAMA_CPP_DIR"]) if "LLAMA_CPP_DIR" in os.environ else None)
    bandwidth = read_bandwidth(chosen)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown CPU") if Path("/proc/cpuinfo").exists() else "unknown CPU"
    print(f"device {chosen} ({cpu}), {torch.get_num_threads()} threads, torch {torch.__version__}; read bandwidth "
          f"{bandwidth:.1f} GB/s; {prompt_length}-token prompt, {new_tokens} new tokens, greedy, {rounds} rounds, median")

    ours, hf = build_pair(chosen)
    prompt = torch.randint(0, 32000, (1, prompt_length), generator=torch.Generator().manual_seed(1)).to(chosen)
    cache_length = prompt_length + new_tokens
    models = {"float32": ours}
    engines: Dict[str, Callable[[torch.Tensor], Dict[str, object]]] = {
        "transformers float32": lambda p: timed_transformers(hf, p, new_tokens)}
    if bf16:
        hf_bf16 = copy.deepcopy(hf).to(torch.bfloat16)
        engines["transformers bf16"] = lambda p: timed_transformers(hf_bf16, p, new_tokens)
        models["bf16"] = copy.deepcopy(ours).to(torch.bfloat16)
    if bf16 or chosen.type == "cpu":  # on a CPU int8 layers multiply float32 rows fast too (lit_lora/speed/row_kernels.cpp)
        models["int8"] = copy.deepcopy(models["bf16"] if bf16 else ours)
        quantize_model(models["int8"], mode="int8", skip=())
    if bf16:
        models["nf4"] = copy.deepcopy(models["bf16"])  # QLoRA's 4-bit format (the head stays bf16), eagerly
        quantize_model(models["nf4"], mode="nf4")
    bytes_per_token = {f"lit-lora {kind}": weight_bytes_per_token(model) for kind, model in models.items()}
    if "nf4" in models:  # 4 bits and the blocks' scales per weight; the head in bf16
        bytes_per_token["lit-lora nf4"] = int(models["nf4"].lm_head.weight.numel() * 2 + sum(
            bits_per_parameter("nf4") / 8 * m.in_features * m.out_features
            for m in models["nf4"].modules() if isinstance(m, Linear4bit)))
    for kind, model in models.items():
        engines[f"lit-lora {kind}"] = lambda p, model=model: timed_ours(model, p, new_tokens)
        if compile and kind != "nf4":
            compiled = CompiledDecoding(model)  # compiled by the warm-up below
            engines[f"lit-lora {kind} compiled"] = lambda p, c=compiled: timed_ours(c, p, new_tokens, cache_length)
            bytes_per_token[f"lit-lora {kind} compiled"] = bytes_per_token[f"lit-lora {kind}"]
    scorers = {engine: models[engine.split()[1]] for engine in engines if engine.startswith("lit-lora")}
    bytes_per_token["transformers float32"] = bytes_per_token["lit-lora float32"]
    if bf16:
        bytes_per_token["transformers bf16"] = bytes_per_token["lit-lora bf16"]

    with tempfile.TemporaryDirectory(prefix="benchmark_generate_") as tmp:
        llama_cpp = None
        if llama_cpp_dir is not None and chosen.type == "cpu":
            if not tokenizer.is_file():
                raise FileNotFoundError(f"llama.cpp's converter needs a tokenizer.model: {tokenizer} not found (--tokenizer)")
            llama_cpp = LlamaCpp(Path(llama_cpp_dir), hf, tokenizer, Path(tmp), torch.get_num_threads())
            engines.update(llama_cpp.engines(prompt_length, new_tokens))
            weights = bytes_per_token["lit-lora float32"] / 4
            bytes_per_token.update({f"llama.cpp {kind}": weights * size for kind, size in LLAMA_CPP_BYTES_PER_WEIGHT.items()})
        for engine in engines.values():  # warm-up: first-call allocations, kernel selection
            engine(prompt)
        speeds: Dict[str, List[float]] = {engine: [] for engine in engines}
        prefill: Dict[str, List[float]] = {engine: [] for engine in engines}
        failures: Dict[str, str] = {}
        for _ in range(rounds):
            outputs = {engine: run_engine(prompt) for engine, run_engine in engines.items()}
            for engine, output in outputs.items():
                speeds[engine].append(output["tokens_per_second"])
                prefill[engine].append(output["prefill_tokens_per_second"])
                if "failed" in output:
                    failures[engine] = output["failed"]
            for engine in ("lit-lora float32", "lit-lora float32 compiled"):
                if engine in outputs and not torch.equal(outputs[engine]["tokens"], outputs["transformers float32"]["tokens"]):
                    raise RuntimeError(f"{engine}: float32 greedy tokens differ from transformers'")

    exact = outputs["lit-lora float32"]["tokens"]
    sequence = torch.cat([prompt[0], exact.to(chosen)])[None]  # the float32 answer, scored by every lit-lora model
    with torch.inference_mode():
        reference_top1 = ours(sequence)[0, prompt_length - 1: -1].argmax(dim=-1)
    reference = speeds["transformers float32"]
    print("\nfloat32 greedy tokens of lit-lora (eager and compiled) identical to transformers': yes")
    print(f"{'engine':28s} {'tokens/s':>9s} {'vs transformers fp32':>21s} {'bandwidth limit':>16s} {'prefill tok/s':>14s} "
          f"{'same tokens as fp32':>20s} {'teacher-forced top-1':>21s}")
    results: Dict[str, float] = {"bandwidth_gb_s": bandwidth}
    for engine, values in speeds.items():
        if engine in failures:
            print(f"{engine:28s} failed ({failures[engine]})")
            continue
        speed = statistics.median(values)
        ratio = statistics.median(v / r for v, r in zip(values, reference))
        share = speed * bytes_per_token[engine] / (bandwidth * 1e9)
        agree, top1_text = "", ""
        tokens = outputs[engine]["tokens"]
        if tokens is not None and engine in scorers and not engine.startswith("lit-lora float32"):
            first = int((tokens != exact).int().argmax()) if not torch.equal(tokens, exact) else len(exact)
            agree = f"first {first} of {len(exact)}"
            with torch.inference_mode():  # at each position of the float32 answer, the same next token?
                top1 = scorers[engine](sequence)[0, prompt_length - 1: -1].float().argmax(dim=-1)
            results[f"{engine} top-1 agreement"] = (top1 == reference_top1).float().mean().item()
            top1_text = f"{100 * results[f'{engine} top-1 agreement']:.1f}%"
        results[engine], results[f"{engine} ratio"], results[f"{engine} bandwidth share"] = speed, ratio, share
        print(f"{engine:28s} {speed:9.1f} {ratio:20.2f}x {100 * share:15.0f}% {statistics.median(prefill[engine]):14.0f} "
              f"{agree:>20s} {top1_text:>21s}")
    for kind in ("bf16", "q8_0"):
        ours_engine = f"lit-lora {'bf16' if kind == 'bf16' else 'int8'} compiled"
        theirs = f"llama.cpp {kind}"
        if ours_engine in results and theirs in results:
            print(f"{ours_engine} vs {theirs}: {results[ours_engine] / results[theirs]:.2f}x")

    batch_kind = "bf16" if bf16 else "float32"
    print(f"\nbatches ({batch_kind}, generate with a list of prompts; tokens/s of all rows together)")
    prompts = [torch.randint(0, 32000, (prompt_length,), generator=torch.Generator().manual_seed(b)).to(chosen)
               for b in range(max(batch_sizes))]
    runners = {"eager": models[batch_kind]}
    if compile:
        runners["compiled"] = CompiledDecoding(models[batch_kind])
    for name, runner in runners.items():
        batch_speeds: Dict[int, float] = {}
        for size in batch_sizes:
            timed_ours(runner, prompts[:size], new_tokens, cache_length)  # warm-up (and compiling the batch shape)
            batch_speeds[size] = statistics.median(timed_ours(runner, prompts[:size], new_tokens, cache_length)["tokens_per_second"]
                                                   for _ in range(rounds))
            results[f"batch {size} {name}"] = batch_speeds[size]
        print(f"  {name:9s} " + ", ".join(f"batch {size}: {speed:.0f} tok/s ({speed / batch_speeds[batch_sizes[0]]:.1f}x)"
                                          for size, speed in batch_speeds.items()))
    return results


if __name__ == "__main__":
    run(main)
