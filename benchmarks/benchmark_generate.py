"""Decoding speed of lit_lora.generate next to transformers' generate(), same model, same machine, one run.

    python benchmarks/benchmark_generate.py                       # both models, 5 rounds
    python benchmarks/benchmark_generate.py --models '[60M]' --rounds 9 --threads 1

For each model a random Llama is built once and copied into a transformers LlamaForCausalLM with the
same weights. Every round then runs, back to back: transformers in float32 (its default, with its own
KV cache), lit-lora in float32, and, where it is fast (a GPU with bf16, or a CPU with AVX512-BF16/AMX,
detected at run time), transformers and lit-lora in bf16, and lit-lora with int8 weights and bf16
activations (`quantize_model(model, "int8")`, what `generate/*.py --quantize int8` loads), also compiled
(`compile_for_decoding`, what `--compile true` does: torch.compile fuses the ~20 small per-token
operations of each layer, which dominate a small model's decoding on CPU). Greedy decoding, batch 1, a
16-token prompt, 128 new tokens, EOS ignored so every run produces the same number of tokens.

Why int8: decoding one token reads every weight once, so its speed is set by the bytes per weight and
by how well the single-row kernel streams them. In torch 2.13 on CPU, a one-row bf16 F.linear streams
no faster than float32 (measured here: the 60M model's 57 matrices take ~6.5 ms per token either way),
so bf16 weights alone gain little; the int8 x bf16 kernel reads a quarter of float32's bytes (~2 ms).
The int8 and bf16 tokens are not float32's. Two agreements are printed: how many greedy tokens an
engine shares with float32 before the first difference (greedy decoding of a random model amplifies
any rounding: after one different token the answers part ways), and, teacher-forced on the float32
answer, at how many of its positions the engine's most likely next token is float32's.

Reported per engine: decode tokens/s (the tokens after the first over the time after the first, the
prefill excluded) as the median over the rounds, and each engine's speed relative to transformers
float32 as the median of the per-round ratios (the machine may be shared: a ratio of two runs made
seconds apart is far steadier than either speed). The float32 greedy tokens of both engines must be
identical; a mismatch fails the run.
"""

import copy
import statistics
import time
from typing import Callable, Dict, List, Optional

import torch

from lit_lora.cli import run
from lit_lora.generate import generate
from lit_lora.speed import compile_for_decoding, cpu_supports_fast_bf16
from lit_lora.hf_names import config_to_hf, lit_to_hf_name
from lit_lora.model import Config, Llama
from lit_lora.quantize import quantize_model

# name -> (preset, overrides). The ~60M model of the finetuning benchmark (stories42M's shape with an untied
# head: dim 512, 8 layers, 8 heads, MLP 1376, Llama 2's 32k vocabulary), and a smaller one (dim 288,
# 6 layers, head tied to the embedding) where per-token overheads weigh more.
MODELS = {"60M": ("stories42M", dict(vocab_size=32000, tie_embeddings=False)),
          "stories15M": ("stories15M", dict(vocab_size=32000))}


def build_pair(name: str, device: torch.device):
    """A random lit-lora Llama and a transformers LlamaForCausalLM holding the same float32 weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    preset, overrides = MODELS[name]
    config = Config.from_name(preset, **overrides)
    torch.manual_seed(0)
    ours = Llama(config).eval()
    with torch.no_grad():  # a larger head than the training init: confident, varied greedy tokens
        ours.lm_head.weight.normal_(0.0, 0.5)
    hf = LlamaForCausalLM(LlamaConfig(**config_to_hf(config))).eval()
    hf.load_state_dict({lit_to_hf_name(k): v for k, v in ours.state_dict().items()})
    hf.generation_config.eos_token_id = None  # never stop early: every run decodes all new tokens
    hf.generation_config.pad_token_id = 0
    return ours.to(device), hf.to(device)


def timed_ours(model: Llama, prompt: torch.Tensor, new_tokens: int, cache_length: Optional[int] = None) -> Dict[str, object]:
    stamps: List[float] = []
    output = generate(model, prompt[0], new_tokens, temperature=0.0, on_token=lambda ids: stamps.append(time.perf_counter()),
                      cache_length=cache_length)
    return {"tokens": output[prompt.size(1):].cpu(), "tokens_per_second": (len(stamps) - 1) / (stamps[-1] - stamps[0])}


def timed_transformers(model, prompt: torch.Tensor, new_tokens: int) -> Dict[str, object]:
    from transformers.generation.streamers import BaseStreamer

    stamps: List[float] = []

    class Clock(BaseStreamer):  # transformers calls put() with the prompt, then once per new token
        def put(self, value):
            stamps.append(time.perf_counter())

        def end(self):
            pass

    with torch.inference_mode():
        output = model.generate(prompt, max_new_tokens=new_tokens, do_sample=False, streamer=Clock(),
                                attention_mask=torch.ones_like(prompt))
    new = stamps[1:]  # drop the prompt's put()
    return {"tokens": output[0, prompt.size(1):].cpu(), "tokens_per_second": (len(new) - 1) / (new[-1] - new[0])}


def main(
    models: List[str] = ["60M", "stories15M"],
    rounds: int = 5,
    prompt_length: int = 16,
    new_tokens: int = 128,
    threads: Optional[int] = None,
    device: str = "cpu",
    bf16: Optional[bool] = None,
    compile: bool = True,
) -> Dict[str, Dict[str, float]]:
    """Benchmark decoding against transformers; prints a table and returns the medians.

    Args:
        models: which models to build (random weights, 32k vocabulary): 60M and/or stories15M.
        rounds: how many times every engine runs; medians are reported.
        prompt_length: tokens in the (random) prompt.
        new_tokens: tokens generated per run.
        threads: torch CPU threads (default: torch's choice).
        device: cpu or cuda.
        bf16: also run bf16 and int8 (default: on a GPU with bf16, or a CPU with AVX512-BF16/AMX).
        compile: also run the int8 model through torch.compile, as `generate/*.py --compile true` does
            (compiled during the warm-up, which is not timed).
    """
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        raise ValueError(f"unknown models {unknown}; choose from {sorted(MODELS)}")
    if threads is not None:
        torch.set_num_threads(threads)
    chosen = torch.device(device)
    if bf16 is None:
        bf16 = torch.cuda.is_bf16_supported() if chosen.type == "cuda" else cpu_supports_fast_bf16()
    print(f"device {chosen}, {torch.get_num_threads()} threads, torch {torch.__version__}, batch 1, "
          f"{prompt_length}-token prompt, {new_tokens} new tokens, greedy, {rounds} rounds, median")

    results = {}
    for name in models:
        ours, hf = build_pair(name, chosen)
        prompt = torch.randint(0, ours.config.vocab_size, (1, prompt_length), generator=torch.Generator().manual_seed(1)).to(chosen)
        engines: Dict[str, Callable[[torch.Tensor], Dict[str, object]]] = {
            "transformers float32": lambda p: timed_transformers(hf, p, new_tokens),
            "lit-lora float32": lambda p: timed_ours(ours, p, new_tokens),
        }
        # Each engine's model as a function of a whole sequence -> logits (1, T, V), for the agreement check.
        scorers = {"transformers float32": lambda ids: hf(ids).logits, "lit-lora float32": ours}
        if bf16:
            hf_bf16, ours_bf16 = copy.deepcopy(hf).to(torch.bfloat16), copy.deepcopy(ours).to(torch.bfloat16)
            engines["transformers bf16"] = lambda p: timed_transformers(hf_bf16, p, new_tokens)
            engines["lit-lora bf16"] = lambda p: timed_ours(ours_bf16, p, new_tokens)
            scorers.update({"transformers bf16": lambda ids: hf_bf16(ids).logits, "lit-lora bf16": ours_bf16})
            ours_int8 = copy.deepcopy(ours_bf16)
            quantize_model(ours_int8, mode="int8", skip=())
            engines["lit-lora int8"] = lambda p: timed_ours(ours_int8, p, new_tokens)
            scorers["lit-lora int8"] = ours_int8
            if compile:
                compiled = compile_for_decoding(ours_int8, prompt[0])
                engines["lit-lora int8 compiled"] = lambda p: timed_ours(compiled, p, new_tokens, ours.config.block_size)
                scorers["lit-lora int8 compiled"] = ours_int8
        for engine in engines.values():  # warm-up: first-call allocations, kernel selection
            engine(prompt)

        speeds: Dict[str, List[float]] = {engine: [] for engine in engines}
        for _ in range(rounds):
            outputs = {engine: run_engine(prompt) for engine, run_engine in engines.items()}
            for engine, output in outputs.items():
                speeds[engine].append(output["tokens_per_second"])
            if not torch.equal(outputs["lit-lora float32"]["tokens"], outputs["transformers float32"]["tokens"]):
                raise RuntimeError(f"{name}: float32 greedy tokens differ from transformers'")
        reference = speeds["transformers float32"]
        parameters = sum(p.numel() for p in ours.parameters())
        print(f"\n{name} ({parameters / 1e6:.1f}M parameters); float32 greedy tokens identical to transformers': yes")
        print(f"{'engine':24s} {'tokens/s':>9s} {'vs transformers float32':>24s} {'same tokens as float32':>23s} "
              f"{'teacher-forced top-1 = float32':>31s}")
        results[name] = {}
        exact = outputs["lit-lora float32"]["tokens"]
        sequence = torch.cat([prompt[0], exact.to(chosen)])[None]  # the float32 answer, scored by every model
        with torch.inference_mode():
            reference_top1 = ours(sequence)[0, prompt.size(1) - 1 : -1].argmax(dim=-1)
        for engine, values in speeds.items():
            ratio = statistics.median(v / r for v, r in zip(values, reference))
            results[name][engine] = statistics.median(values)
            results[name][f"{engine} ratio"] = ratio
            tokens = outputs[engine]["tokens"]
            agree = int((tokens != exact).int().argmax()) if not torch.equal(tokens, exact) else len(exact)
            with torch.inference_mode():  # at each position of the float32 answer, the same next token?
                top1 = scorers[engine](sequence)[0, prompt.size(1) - 1 : -1].float().argmax(dim=-1)
            same_top1 = (top1 == reference_top1).float().mean().item()
            results[name][f"{engine} top-1 agreement"] = same_top1
            print(f"{engine:24s} {statistics.median(values):9.1f} {ratio:23.2f}x {f'first {agree} of {len(exact)}':>23s} "
                  f"{100 * same_top1:30.1f}%")
    return results


if __name__ == "__main__":
    run(main)
