"""Benchmark: prepare a full-size Alpaca (52,002 records) and compare tokenizing in batches with a loop.

The 52k file is simulated by repeating a local Alpaca sample; the timed code is exactly what
scripts/prepare_alpaca.py runs. The target: the whole preparation in under 60 s on 2 cores.

    python benchmarks/benchmark_prepare.py --tokenizer_path checkpoints/meta-llama/Llama-2-7b-hf/tokenizer.model \
        --data_file data/alpaca/alpaca_data.json
"""

import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from lit_lora.prompts import get_prompt_style
from lit_lora.tokenizer import Tokenizer
from lit_lora.workflows.cli import run
from lit_lora.workflows.prepare import prepare_instruction_data, read_examples


def main(
    data_file: Path = Path("data/alpaca/alpaca_data.json"),
    tokenizer_path: Path = Path("checkpoints/meta-llama/Llama-2-7b-hf/tokenizer.model"),
    n_records: int = 52002,
    repeats: int = 3,
) -> dict:
    """Time `prepare_instruction_data` on `n_records` records, `repeats` times.

    Args:
        data_file: an Alpaca-format JSON file, repeated until it holds `n_records` records.
        tokenizer_path: the Llama 2 tokenizer.model.
        n_records: records in the simulated dataset (Alpaca has 52,002).
        repeats: how many times to time each measurement (the machine may be shared: look at the minimum).
    """
    records = json.loads(Path(data_file).read_text(encoding="utf-8-sig"))
    records = (records * (n_records // len(records) + 1))[:n_records]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"{n_records} records, {cores} cores available, torch/sentencepiece threads: {torch.get_num_threads()}")

    with tempfile.TemporaryDirectory() as tmp:
        big_file = Path(tmp) / "alpaca_52k.json"
        big_file.write_text(json.dumps(records))
        totals = []
        for attempt in range(repeats):
            start = time.perf_counter()
            config = prepare_instruction_data(big_file, Path(tmp) / "out", tokenizer_path, val_size=2000)
            totals.append(time.perf_counter() - start)
            print(f"  full preparation, run {attempt + 1}: {totals[-1]:.1f} s (kept {config['counts']['kept']})")

        # The tokenization step alone: one batched call (what prepare does) vs. a Python loop per text.
        examples, _, _ = read_examples(big_file)
        style, tokenizer = get_prompt_style("alpaca"), Tokenizer(tokenizer_path)
        texts = [style.format(e.instruction, e.input) for e in examples] + [e.output for e in examples]
        batch_times, loop_times = [], []
        for _ in range(repeats):
            start = time.perf_counter()
            batched = tokenizer.processor.encode(texts, out_type=int, num_threads=torch.get_num_threads())
            batch_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            looped = [tokenizer.processor.EncodeAsIds(text) for text in texts]
            loop_times.append(time.perf_counter() - start)
        assert batched == looped

    result = {"full_min_s": min(totals), "full_median_s": statistics.median(totals),
              "batch_encode_min_s": min(batch_times), "loop_encode_min_s": min(loop_times)}
    print(f"full preparation: min {result['full_min_s']:.1f} s, median {result['full_median_s']:.1f} s "
          f"(target < 60 s on 2 cores)")
    print(f"tokenization: batched {result['batch_encode_min_s']:.1f} s vs. per-text loop {result['loop_encode_min_s']:.1f} s "
          f"(loop / batched = {result['loop_encode_min_s'] / result['batch_encode_min_s']:.2f}x)")
    return result


if __name__ == "__main__":
    run(main)
