"""Packed rows against padded batches: useful (non-padding) tokens per second of fit's LoRA step on real data.

    python benchmarks/benchmark_packing.py                     # float32, then bf16-true if the CPU has it
    python benchmarks/benchmark_packing.py --compile true      # both sides compiled, as finetune --compile

The real Alpaca sample (102 records, in the data folder beside the project) is prepared with the Llama 2 tokenizer at
--max_seq_length 256 (prompts masked, as scripts/prepare_alpaca.py does), and fit's own `train_step`
(forward, loss, backward, clipping, AdamW; LoRA r = 8 on q and v) runs on the 58M benchmark model (dim 512,
8 layers, 32k vocabulary, untied head) two ways, at the same number of rows per micro-batch (4):

  padded   the default: 4 samples per micro-batch, padded to the longest of them (`BatchSampler`)
  packed   --train.packing: 4 rows as long as the longest sample, each filled with whole samples
           (`PackedBatchSampler`; a block-diagonal mask keeps them apart)

Useful tokens are the samples' own tokens; padding does not count. Each round runs an epoch's worth
of micro-batches of one side, then of the other (the starting side alternating); the speed ratio is the
median over rounds of the per-round ratios, so a machine that gets busier or quieter shifts both alike.
Also printed: the share of each micro-batch that is padding, the model FLOPs utilisation of the
useful tokens (MFU, against the matmul peak measured in the same run, as benchmark_finetune.py), and
what the attention kernel pays for the packed rows' block-diagonal mask: forward and backward of
`F.scaled_dot_product_attention` on one layer's (4, 8, T, 64) queries, keys and values with the packed
mask, against the same call with `is_causal=True` (the padded batches' kernel).
"""

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

import torch
# the same peak and FLOP count as the other benchmarks (run as a script, this folder is on sys.path)
from benchmark_finetune import matmul_peak_gflops  # noqa: E402
from gpu_check import training_flops_per_token  # noqa: E402

from lit_lora.data import BatchSampler, PackedBatchSampler, load_prepared_split
from lit_lora.lora import LoRAConfig, add_lora, mark_only_lora_as_trainable
from lit_lora.model import Config, Llama
from lit_lora.speed.decoding import cpu_supports_fast_bf16
from lit_lora.train import PRECISION_DTYPES, Loop, TrainArgs, compiled_if_asked, setup_fabric, train_step
from lit_lora.workflows.cli import run
from lit_lora.workflows.prepare import prepare_instruction_data


SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
ROWS = 4


def attention_mask_cost(dtype: torch.dtype, row_length: int, lengths: List[int], repeats: int = 9) -> float:
    """Time of SDPA forward + backward with a packed row's block-diagonal mask over its time with is_causal."""
    import torch.nn.functional as F

    from lit_lora.model import packed_positions_and_mask

    q, k, v = (torch.randn(ROWS, 8, row_length, 64, dtype=dtype, requires_grad=True) for _ in range(3))
    segment_ids = torch.zeros(ROWS, row_length, dtype=torch.long)
    end = 0
    for segment, length in enumerate(lengths):  # samples of the real lengths, back to back
        if end + length > row_length:
            break
        segment_ids[:, end:end + length] = segment
        end += length
    segment_ids[:, end:] = segment + 1
    mask = packed_positions_and_mask(segment_ids)[1]

    def seconds(**kwargs) -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            F.scaled_dot_product_attention(q, k, v, **kwargs).sum().backward()
            times.append(time.perf_counter() - start)
        return statistics.median(times[2:])

    return seconds(attn_mask=mask) / seconds(is_causal=True)


def side(precision: str, sampler: Any, data: List[Dict[str, torch.Tensor]], compile_model: bool, workdir: Path):
    """fit's step on a fresh copy of the model with `sampler`'s batches; returns step(batch) -> tokens run, and
    the model."""
    torch.manual_seed(0)
    config = Config.from_name("stories42M", vocab_size=32000, tie_embeddings=False, block_size=256)
    model = Llama(config).to(PRECISION_DTYPES.get(precision, torch.float32))
    add_lora(model, LoRAConfig(r=8, alpha=16, dropout=0.0))
    mark_only_lora_as_trainable(model)
    fabric = setup_fabric(workdir, precision, accelerator="cpu")
    runner = compiled_if_asked(fabric, model, compile_model)
    wrapped = fabric.setup_module(runner)
    trainable = [p for p in wrapped.parameters() if p.requires_grad]
    optimizer = fabric.setup_optimizers(torch.optim.AdamW(trainable, lr=3e-4, betas=(0.9, 0.95)))
    args = TrainArgs(micro_batch_size=ROWS, global_batch_size=ROWS, learning_rate=3e-4)
    loop = Loop(fabric, wrapped, optimizer, sampler, args, workdir, {}, {"step": 0, "history": []}, compiled=runner is not model)
    return (lambda batch: train_step(loop, data, [batch], 3e-4)[1]), model


def main(compile: bool = False, rounds: int = 5, threads: int = 0, max_seq_length: int = 256,
         modes: List[str] = ["32-true", "bf16-true"]) -> Dict[str, Dict[str, float]]:
    """Time padded and packed LoRA steps on the real Alpaca sample; print useful tokens/s and the ratio.

    Args:
        compile: run both sides compiled (finetune --compile); the first pass over the batches compiles
            and is not timed.
        rounds: timing rounds; each runs one epoch of micro-batches per side.
        threads: torch threads (0: torch's default).
        max_seq_length: --max_seq_length of the preparation (the packed rows' length is the longest sample).
        modes: precisions to run; bf16-true is skipped on a CPU without native bf16.
    """
    if threads:
        torch.set_num_threads(threads)
    source, tokenizer = SHARED / "alpaca" / "alpaca_data_sample.json", SHARED / "llama2-tokenizer" / "tokenizer.model"
    if not source.is_file() or not tokenizer.is_file():
        raise FileNotFoundError(f"the real Alpaca sample and Llama 2 tokenizer are expected in {SHARED}")
    if "bf16-true" in modes and not cpu_supports_fast_bf16():
        print("bf16-true skipped: this CPU has no native bf16")
        modes = [m for m in modes if m != "bf16-true"]
    results: Dict[str, Dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="benchmark_packing_") as tmp:
        prepare_instruction_data(source, Path(tmp) / "data", tokenizer, max_seq_length=max_seq_length, val_size=0, seed=42)
        data = load_prepared_split(Path(tmp) / "data", "train")
        lengths = [len(sample["input_ids"]) for sample in data]
        samplers = {"padded": BatchSampler(lengths, ROWS, shuffle=True, seed=0),
                    "packed": PackedBatchSampler(lengths, ROWS, row_length=max(lengths), seed=0)}
        print(f"{torch.get_num_threads()} threads, torch {torch.__version__}; {len(data)} Alpaca samples of "
              f"{min(lengths)}-{max(lengths)} tokens (median {statistics.median(lengths):.0f}); {ROWS} rows per "
              f"micro-batch; compiled: {compile}")
        for mode in modes:
            steps, batches, padding = {}, {}, {}
            for name, sampler in samplers.items():
                steps[name], model = side(mode, sampler, data, compile, Path(tmp) / f"{mode}-{name}")
                batches[name] = sampler.batches(0)
                run_tokens = sum(steps[name](batch) for batch in batches[name])  # warm-up (and compiling)
                padding[name] = 1 - sum(lengths) / run_tokens
            speeds: Dict[str, List[float]] = {name: [] for name in samplers}
            for round_index in range(rounds):
                for name in (list(samplers) if round_index % 2 == 0 else list(samplers)[::-1]):
                    start = time.perf_counter()
                    for batch in batches[name]:
                        steps[name](batch)
                    speeds[name].append(sum(lengths) / (time.perf_counter() - start))  # useful tokens per second
            ratio = statistics.median(p / q for p, q in zip(speeds["packed"], speeds["padded"]))
            dtype = torch.bfloat16 if mode == "bf16-true" else torch.float32
            peak = matmul_peak_gflops(dtype) * 1e9
            flops = training_flops_per_token(model, max(lengths))
            results[mode] = {"ratio": ratio, **{f"{name} useful tokens/s": statistics.median(v) for name, v in speeds.items()}}
            print(f"\n[{mode}] matmul peak {peak / 1e9:.0f} GFLOP/s")
            for name in samplers:
                speed = statistics.median(speeds[name])
                print(f"  {name}: {speed:7.0f} useful tokens/s (range {min(speeds[name]):.0f}-{max(speeds[name]):.0f}), "
                      f"{100 * padding[name]:.0f} % padding, {len(batches[name])} micro-batches per epoch, "
                      f"MFU of useful tokens {100 * speed * flops / peak:.1f} %")
            print(f"  packed vs padded: {ratio:.2f}x useful tokens/s (target >= 1.5x): {'met' if ratio >= 1.5 else 'NOT met'}; "
                  f"removing the padding at an equal cost per token would give {(1 - padding['packed']) / (1 - padding['padded']):.2f}x")
            print(f"  attention with the packed mask: {attention_mask_cost(dtype, max(lengths), lengths):.2f}x the time of "
                  "is_causal (SDPA forward + backward, one layer)")
    return results


if __name__ == "__main__":
    run(main)
