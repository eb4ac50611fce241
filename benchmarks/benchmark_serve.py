"""Throughput of generate/serve.py under concurrent clients, one adapter or several, same model, same run.

    python benchmarks/benchmark_serve.py                                 # the 60M model, 4 LoRA adapters
    python benchmarks/benchmark_serve.py --llama_cpp_dir ~/llama.cpp     # and llama-server beside it

The model has the shape of the decoding benchmark (benchmarks/benchmark_generate.py: stories42M with an
untied head, 60M parameters), random, saved as a lit-lora checkpoint with four random LoRA adapters (q and
v, r = 8). The real server is started (HTTP on 127.0.0.1, the dtype `auto` picks) and driven with the
`openai` client: every client sends its requests one after the other (a 16-token prompt, 128 new tokens,
EOS ignored, greedy, streamed), all clients at once. Three loads, one after the other, in each of
`--rounds` rounds of one run:

  1 client, one adapter          the single-user speed
  16 clients, one adapter        the same adapter for all: batches of up to 16 rows
  16 clients over 4 adapters     client i uses adapter i mod 4: every batch mixes the four

Reported: tokens/s of all clients together (new tokens over the wall time of the load), the time to first
token (the median and the slowest, from sending a request to its first streamed text), the rows per
decoding step from the server's /metrics (medians over the rounds), and the ratios 16 clients / 1 client
and 4 adapters / 1 adapter (median and range of the rounds' ratios). Then the model alone, without the
server: one decoding step of 1 row and of 16 rows, and the ratio a server without overhead would reach.
With --llama_cpp_dir (a llama.cpp tree with convert_hf_to_gguf.py and build/bin/llama-server) the same
16-client load runs against llama-server on a GGUF conversion of the same base weights (f32, 16 parallel
slots, as many threads) and the ratio of the two throughputs is printed; without it, that line says so.
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Dict, List, Optional

import torch

from lit_lora.files.checkpoint import save_checkpoint
from lit_lora.files.convert import convert_lit_checkpoint
from lit_lora.lora import LoRAConfig, add_lora, lora_layers, remove_lora
from lit_lora.methods import save_weights
from lit_lora.model import Config, Llama
from lit_lora.workflows.cli import run
from lit_lora.workflows.inference import load_for_generation
from lit_lora.workflows.serve import free_port, wait_until_serving


ROOT = Path(__file__).resolve().parents[1]
SHARED_TOKENIZER = ROOT.parent / "shared" / "data" / "llama2-tokenizer" / "tokenizer.model"


def build_checkpoint(root: Path, tokenizer: Path, adapters: int) -> Dict[str, Path]:
    """The 60M random base in root/base and `adapters` random LoRA files; returns {name: path}."""
    config = Config.from_name("stories42M", vocab_size=32000, tie_embeddings=False)
    torch.manual_seed(0)
    model = Llama(config).eval()
    with torch.no_grad():  # a larger head than the training init: confident, varied greedy tokens
        model.lm_head.weight.normal_(0.0, 0.5)
    save_checkpoint(root / "base", model.state_dict(), config, tokenizer_path=tokenizer)
    files = {}
    for index in range(adapters):
        add_lora(model, LoRAConfig(r=8, alpha=16))
        with torch.no_grad():
            for layer in lora_layers(model).values():
                layer.lora_B.normal_(0.0, 0.02)
        files[f"adapter{index}"] = save_weights(root / f"adapter{index}.safetensors", model, "lora", LoRAConfig(r=8, alpha=16))
        remove_lora(model)
    return files


def load(url: str, models: List[str], clients: int, requests_per_client: int, prompt_length: int,
         new_tokens: int) -> Dict[str, float]:
    """`clients` threads, client i asking models[i % len(models)] `requests_per_client` times in a row."""
    from openai import OpenAI

    api = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
    first_token: List[float] = []
    tokens: List[int] = []
    lock = threading.Lock()

    def client(index: int) -> None:
        prompt = [1] + [(index * 7919 + t * 104729) % 31000 + 500 for t in range(prompt_length - 1)]
        for _ in range(requests_per_client):
            sent, first, count = time.perf_counter(), None, 0
            stream = api.completions.create(model=models[index % len(models)], prompt=prompt, max_tokens=new_tokens,
                                            temperature=0, stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True})
            for chunk in stream:
                if chunk.choices and first is None:
                    first = time.perf_counter()
                if chunk.usage is not None:
                    count = chunk.usage.completion_tokens
            with lock:
                first_token.append(first - sent)
                tokens.append(count or new_tokens)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - start
    return {"tokens_per_second": sum(tokens) / seconds, "ttft_median": statistics.median(first_token),
            "ttft_max": max(first_token), "seconds": seconds}


def decode_step_milliseconds(checkpoint: Path, rows: int, dtype: str, threads: Optional[int],
                             repeats: int = 30) -> Dict[str, float]:
    """The model alone (no server), loaded in the dtype and run on the threads the server gets: the median
    time of one decoding step of 1 row and of `rows` rows, interleaved so the machine's load hits both."""
    if threads:
        torch.set_num_threads(threads)
    model = load_for_generation(checkpoint, "cpu", dtype)
    model.set_kv_cache(rows, 1024)
    ids = torch.randint(0, model.config.vocab_size, (rows, 1), generator=torch.Generator().manual_seed(0))
    cases = {"1 row": ids[:1], f"{rows} rows": ids}
    times: Dict[str, List[float]] = {label: [] for label in cases}
    with torch.inference_mode():
        for repeat in range(repeats + 3):
            for label, batch in cases.items():
                start = time.perf_counter()
                model(batch, torch.tensor([80]), left_pad=torch.zeros(len(batch), dtype=torch.long))
                if repeat >= 3:  # the first calls allocate
                    times[label].append(time.perf_counter() - start)
    return {label: 1000 * statistics.median(values) for label, values in times.items()}


def metrics(url: str) -> Dict[str, float]:
    return json.loads(urllib.request.urlopen(url + "/metrics", timeout=10).read())


def llama_server_load(llama_cpp_dir: Path, checkpoint: Path, workdir: Path, clients: int, threads: int,
                      requests_per_client: int, prompt_length: int, new_tokens: int) -> Dict[str, float]:
    """The same load against llama-server on an f32 GGUF of the same base weights, `clients` parallel slots."""
    hf_dir = convert_lit_checkpoint(checkpoint, workdir / "hf")
    if not (hf_dir / "tokenizer.model").is_file():
        (hf_dir / "tokenizer.model").write_bytes((checkpoint / "tokenizer.model").read_bytes())
    gguf = workdir / "base-f32.gguf"
    subprocess.run([sys.executable, str(llama_cpp_dir / "convert_hf_to_gguf.py"), str(hf_dir), "--outtype", "f32",
                    "--outfile", str(gguf)], check=True, capture_output=True)
    port, log = free_port(), workdir / "llama-server.log"
    context = clients * (prompt_length + new_tokens + 8)  # llama-server splits its context among the slots
    with open(log, "w") as output:
        process = subprocess.Popen([str(llama_cpp_dir / "build" / "bin" / "llama-server"), "-m", str(gguf), "--host",
                                    "127.0.0.1", "--port", str(port), "--parallel", str(clients), "-c", str(context),
                                    "-t", str(threads)], stdout=output, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_serving(process, url, log)
        return load(url, ["base"], clients, requests_per_client, prompt_length, new_tokens)
    finally:
        process.terminate()
        process.wait(60)


def main(
    clients: int = 16,
    adapters: int = 4,
    rounds: int = 3,
    requests_per_client: int = 1,
    single_requests: int = 2,
    prompt_length: int = 16,
    new_tokens: int = 128,
    dtype: str = "auto",
    threads: Optional[int] = None,
    tokenizer: Path = SHARED_TOKENIZER,
    llama_cpp_dir: Optional[Path] = None,
) -> Dict[str, List[Dict[str, float]]]:
    """Run the three loads (and llama-server's) and print the table and ratios.

    Args:
        clients: concurrent clients of the busy loads (the server's max_batch_size too).
        adapters: LoRA adapters the busy mixed load spreads its clients over.
        rounds: times the three loads run, one after the other in each round (a shared machine's load
            then shifts all three alike); the ratios are the medians of the rounds' ratios.
        requests_per_client: requests each client sends in the busy loads.
        single_requests: requests the one client sends.
        prompt_length: prompt tokens of every request.
        new_tokens: tokens every answer decodes (EOS ignored).
        dtype: the server's dtype ("auto": bf16 on a CPU with native bf16, else float32).
        threads: CPU threads of the server (default: torch's choice).
        tokenizer: a Llama 2 tokenizer.model for the checkpoint (the server encodes chat with it).
        llama_cpp_dir: a llama.cpp tree with its converter and a built llama-server, to compare with.
    """
    results: Dict[str, List[Dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        files = build_checkpoint(workdir, tokenizer, adapters)
        names = list(files)
        port, log = free_port(), workdir / "server.log"
        environment = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
        command = [sys.executable, str(ROOT / "generate" / "serve.py"), "--checkpoint_dir", str(workdir / "base"),
                   "--name", "base", "--adapters", json.dumps([f"{n}={p}" for n, p in files.items()]),
                   "--port", str(port), "--dtype", dtype, "--max_batch_size", str(clients), "--max_waiting", str(clients)]
        with open(log, "w") as output:
            process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=environment)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_until_serving(process, url, log)
            load(url, names[:1], 2, 1, prompt_length, 8)  # warm up: first calls allocate and page in
            loads = {"1 client, 1 adapter": (names[:1], 1, single_requests),
                     f"{clients} clients, 1 adapter": (names[:1], clients, requests_per_client),
                     f"{clients} clients, {adapters} adapters": (names, clients, requests_per_client)}
            for _ in range(rounds):
                for label, (models, count, repeats) in loads.items():
                    before = metrics(url)
                    result = load(url, models, count, repeats, prompt_length, new_tokens)
                    after = metrics(url)
                    steps = after["decode_steps"] - before["decode_steps"]
                    result["rows_per_step"] = (after["rows_decoded"] - before["rows_decoded"]) / max(steps, 1)
                    result["mixed_steps"] = after["mixed_steps"] - before["mixed_steps"]
                    results.setdefault(label, []).append(result)
        finally:
            process.terminate()
            process.wait(60)
        if llama_cpp_dir is not None:
            results[f"llama-server, {clients} clients"] = [llama_server_load(
                llama_cpp_dir, workdir / "base", workdir, clients, threads or torch.get_num_threads(),
                requests_per_client, prompt_length, new_tokens)]
        print(log.read_text().splitlines()[1])  # "serving base (base), adapter0 (lora), ..."
        step_ms = decode_step_milliseconds(workdir / "base", clients, dtype, threads)

    print(f"\n{'load (median of rounds)':<28} {'tokens/s':>9} {'TTFT median':>12} {'TTFT max':>9} {'rows/step':>10} {'mixed steps':>12}")
    for label, runs in results.items():
        median = {key: statistics.median(run.get(key, float("nan")) for run in runs) for key in runs[0]}
        print(f"{label:<28} {median['tokens_per_second']:9.1f} {median['ttft_median']:11.3f}s {median['ttft_max']:8.3f}s "
              f"{median.get('rows_per_step', float('nan')):10.1f} {median.get('mixed_steps', float('nan')):12.0f}")
    single, busy, mixed = ([run["tokens_per_second"] for run in results[label]] for label in list(results)[:3])
    for name, ratios, target in ((f"{clients} clients / 1 client", [b / s for b, s in zip(busy, single)], 6),
                                 (f"{adapters} adapters / 1 adapter at {clients} clients", [m / b for m, b in zip(mixed, busy)], 0.8)):
        print(f"{name}: {statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}x over {len(ratios)} rounds; "
              f"target >= {target})")
    print("\nthe model alone, one decoding step at position 80 (medians): " + ", ".join(f"{label} {ms:.1f} ms"
                                                                                for label, ms in step_ms.items()))
    one, many = step_ms["1 row"], step_ms[f"{clients} rows"]
    print(f"  {clients} rows / 1 row, tokens per second: {clients * one / many:.2f}x, what a server without any "
          "overhead would reach")
    if llama_cpp_dir is not None:
        theirs = results[f"llama-server, {clients} clients"][0]["tokens_per_second"]
        print(f"lit-lora (one LoRA adapter) / llama-server (the base) at {clients} clients: "
              f"{statistics.median(busy) / theirs:.2f}x")
    else:
        print("llama-server: not compared (give --llama_cpp_dir with a built llama.cpp)")
    return results


if __name__ == "__main__":
    run(main)
