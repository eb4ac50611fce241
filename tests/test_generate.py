import io
import json
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_greedy_tokens, lit_from_hf, make_hf_llama

from lit_lora.adapter import AdapterConfig, add_adapter
from lit_lora.files.checkpoint import load_checkpoint, save_checkpoint
from lit_lora.files.hf_names import lit_to_hf_name
from lit_lora.generate import generate, sample_next_token, top_k_filter, top_p_filter
from lit_lora.lora import LoRAConfig, add_lora, lora_layers, merge_lora, remove_lora
from lit_lora.methods import apply_weights, save_weights
from lit_lora.model import Config, Llama
from lit_lora.prompts import get_prompt_style
from lit_lora.speed.decoding import cpu_supports_fast_bf16
from lit_lora.tokenizer import Tokenizer
from lit_lora.workflows.inference import TextStreamer, choose_dtype


ROOT = Path(__file__).resolve().parents[1]
NEW_TOKENS = 64


def generate_script(name):
    """The `main` of generate/<name>.py, called in-process (no interpreter start per test)."""
    return runpy.run_path(str(ROOT / "generate" / f"{name}.py"))["main"]


def hf_greedy(hf_model, prompt, max_new_tokens=NEW_TOKENS, eos_id=None):
    """transformers' own generate(): greedy, with its KV cache, stopping at eos_id only if one is given."""
    hf_model.generation_config.eos_token_id = None  # the tiny config's default EOS (2) must not stop it early
    hf_model.generation_config.pad_token_id = 0
    with torch.no_grad():
        return hf_model.generate(prompt, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos_id,
                                 attention_mask=torch.ones_like(prompt))


def logits_of(model):
    """next_token_logits for assert_greedy_tokens: a transformers/PEFT model's logits over (T,) ids."""
    return lambda ids: model(ids[None]).logits[0]


def varied(ids):
    """The comparison is not between two runs of one repeated token."""
    return len(set(ids.tolist())) >= 8


# 1. Greedy decoding equals transformers' generate() ---------------------------------------------------

@pytest.mark.parametrize("n_kv_heads", [4, 2], ids=["MHA", "GQA"])
def test_greedy_matches_transformers_generate(n_kv_heads):
    hf = make_hf_llama(n_kv_heads=n_kv_heads)
    ours = lit_from_hf(hf)
    prompt = torch.randint(0, hf.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(0))
    expected = hf_greedy(hf, prompt)
    actual = generate(ours, prompt[0], NEW_TOKENS, temperature=0.0)
    assert actual.shape == (9 + NEW_TOKENS,)  # 1-D in, 1-D out; no early stop without eos_id
    assert varied(actual[9:])
    # Our decoding against transformers' (other kernels): equal ids, up to near-ties of the logits.
    assert_greedy_tokens(actual, expected[0], logits_of(hf), prompt_length=9)
    assert ours.layers[0].attn.kv_cache is None  # the cache is gone again


def test_batch_and_eos_match_transformers_generate():
    hf = make_hf_llama(n_kv_heads=2)
    ours = lit_from_hf(hf)
    prompts = torch.randint(0, hf.config.vocab_size, (3, 6), generator=torch.Generator().manual_seed(1))
    full = hf_greedy(hf, prompts, max_new_tokens=20)
    batch_full = generate(ours, prompts, 20, temperature=0.0)  # (B, T) in, (B, T + new) out
    single = [generate(ours, prompts[row], 20, temperature=0.0) for row in range(3)]
    assert batch_full.shape == full.shape
    for row in range(3):  # ours (batched and one prompt at a time) against transformers: other kernels, so
        # equal ids up to near-ties of the logits
        assert_greedy_tokens(batch_full[row], full[row], logits_of(hf), prompt_length=6)
        assert_greedy_tokens(single[row], full[row], logits_of(hf), prompt_length=6)

    # Pick as EOS a token that row 0 produces at step 5: row 0 stops there, the others run on. The stops
    # are read from our own runs without EOS, the same computation as the runs with EOS up to the stop.
    eos_id = int(single[0][6 + 5])

    def first_eos(ids):
        return int((ids[6:] == eos_id).nonzero()[0]) if (ids[6:] == eos_id).any() else None

    expected = hf_greedy(hf, prompts[:1], max_new_tokens=20, eos_id=eos_id)
    actual = generate(ours, prompts[0], 20, temperature=0.0, eos_id=eos_id)
    assert torch.equal(actual, single[0][: 6 + first_eos(single[0]) + 1]) and actual[-1] == eos_id
    assert_greedy_tokens(actual, expected[0], logits_of(hf), prompt_length=6, eos_id=eos_id)  # as transformers stops
    batch = generate(ours, prompts, 20, temperature=0.0, eos_id=eos_id)
    for row in range(3):
        stop = 6 + (first_eos(batch_full[row]) + 1 if first_eos(batch_full[row]) is not None else 20)
        assert torch.equal(batch[row, :stop], batch_full[row, :stop])
        assert (batch[row, stop:] == eos_id).all()  # finished rows are padded with EOS


@pytest.mark.parametrize("n_kv_heads", [4, 2])
def test_prompts_of_different_lengths_in_one_batch_answer_as_each_alone(n_kv_heads):
    """A list of prompts is left-padded into one batch; every row's greedy ids (float32) are those of its
    prompt generated alone, each stopping at its own EOS, and those of transformers' left-padded batch."""
    hf = make_hf_llama(n_kv_heads=n_kv_heads)
    ours = lit_from_hf(hf)
    generator = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, hf.config.vocab_size, (n,), generator=generator) for n in (3, 11, 7, 1, 16)]
    alone = [generate(ours, p, 24, temperature=0.0) for p in prompts]
    together = generate(ours, prompts, 24, temperature=0.0)
    assert isinstance(together, list) and len(together) == len(prompts)
    for row, prompt in enumerate(prompts):  # another computation path (padded, batched): up to near-ties
        assert_greedy_tokens(together[row], alone[row], logits_of(hf), prompt_length=len(prompt))

    padded = torch.zeros(len(prompts), 16, dtype=torch.long)
    attention_mask = torch.zeros_like(padded)
    for row, prompt in enumerate(prompts):
        padded[row, 16 - len(prompt):], attention_mask[row, 16 - len(prompt):] = prompt, 1
    hf.generation_config.eos_token_id, hf.generation_config.pad_token_id = None, 0
    with torch.no_grad():
        theirs = hf.generate(padded, attention_mask=attention_mask, max_new_tokens=24, do_sample=False)
    for row, prompt in enumerate(prompts):
        assert_greedy_tokens(together[row], theirs[row, 16 - len(prompt):], logits_of(hf), prompt_length=len(prompt))

    eos_id = int(alone[1][len(prompts[1]) + 4])  # row 1 produces it at its 5th new token
    stopped = generate(ours, prompts, 24, temperature=0.0, eos_id=eos_id)
    for row, prompt in enumerate(prompts):
        new = together[row][len(prompt):]
        end = len(prompt) + (int((new == eos_id).nonzero()[0]) + 1 if (new == eos_id).any() else len(new))
        assert torch.equal(stopped[row], together[row][:end])
    assert stopped[1][-1] == eos_id and len(stopped[1]) <= len(prompts[1]) + 5


def test_generation_stops_at_the_end_of_the_context():
    ours = lit_from_hf(make_hf_llama())  # block_size 128
    prompt = torch.randint(0, 256, (120,))
    assert generate(ours, prompt, 50, temperature=0.0).shape == (128,)
    with pytest.raises(ValueError, match="the prompt is 128 tokens long, but the model's context holds 128"):
        generate(ours, torch.zeros(128, dtype=torch.long), 5)


# 1b. With a LoRA adapter (merged and not) against PEFT, and with a LLaMA-Adapter against PEFT -----------

def randomize(params, seed, std):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in params:
            param.copy_(torch.randn(param.shape, generator=generator) * std)


@pytest.mark.parametrize("n_kv_heads", [4, 2], ids=["MHA", "GQA"])
def test_greedy_with_lora_matches_peft_generate(n_kv_heads):
    from peft import LoraConfig, get_peft_model

    hf = make_hf_llama(n_kv_heads=n_kv_heads)
    ours = lit_from_hf(hf)
    prompt = torch.randint(0, 256, (1, 7), generator=torch.Generator().manual_seed(2))
    base_output = generate(ours, prompt[0], NEW_TOKENS, temperature=0.0)
    add_lora(ours, LoRAConfig(r=4, alpha=8, dropout=0.0, targets=("q", "v", "down")))
    randomize([p for layer in lora_layers(ours).values() for p in (layer.lora_A, layer.lora_B)], seed=3, std=0.2)

    peft_model = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                               target_modules=["q_proj", "v_proj", "down_proj"])).eval()
    peft_layers = {name: m for name, m in peft_model.base_model.model.named_modules() if hasattr(m, "lora_A")}
    assert len(peft_layers) == len(lora_layers(ours))
    with torch.no_grad():
        for name, layer in lora_layers(ours).items():
            twin = peft_layers[lit_to_hf_name(name + ".weight").removesuffix(".weight")]
            twin.lora_A["default"].weight.copy_(layer.lora_A)
            twin.lora_B["default"].weight.copy_(layer.lora_B)
    expected = hf_greedy(peft_model, prompt)[0]

    unmerged = generate(ours, prompt[0], NEW_TOKENS, temperature=0.0)
    merge_lora(ours)
    merged = generate(ours, prompt[0], NEW_TOKENS, temperature=0.0)
    assert not torch.equal(expected, base_output)  # the adapter changes the answer, so the test can fail
    assert varied(expected[7:])
    # Ours (unmerged, then merged weights) against PEFT's decoding: three computation paths, so equal ids
    # up to near-ties of PEFT's logits.
    assert_greedy_tokens(unmerged, expected, logits_of(peft_model), prompt_length=7)
    assert_greedy_tokens(merged, expected, logits_of(peft_model), prompt_length=7)


@pytest.mark.parametrize("n_kv_heads", [4, 2], ids=["MHA", "GQA"])
def test_greedy_with_llama_adapter_matches_peft_generate(n_kv_heads):
    from peft import AdaptionPromptConfig, get_peft_model

    hf = make_hf_llama(n_kv_heads=n_kv_heads, n_layer=4)
    ours = lit_from_hf(hf)
    prompt = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(4))
    base_output = generate(ours, prompt[0], NEW_TOKENS, temperature=0.0)
    add_adapter(ours, AdapterConfig(prompt_length=6, start_layer=1))
    adapters = [block.attn.adapter for block in ours.layers if block.attn.adapter is not None]
    randomize([a.prompt for a in adapters], seed=5, std=1.0)
    randomize([a.gate for a in adapters], seed=6, std=1.0)

    peft_model = get_peft_model(hf, AdaptionPromptConfig(adapter_len=6, adapter_layers=3, target_modules="self_attn",
                                                         task_type="CAUSAL_LM")).eval()
    with torch.no_grad():
        for block, hf_layer in zip(ours.layers, peft_model.base_model.model.model.layers):
            assert hasattr(hf_layer.self_attn, "adaption_prompt") == (block.attn.adapter is not None)
            if block.attn.adapter is not None:
                hf_layer.self_attn.adaption_prompt.copy_(block.attn.adapter.prompt[None])  # PEFT's is (1, L, C)
                hf_layer.self_attn.adaption_gate.copy_(block.attn.adapter.gate)
    expected = hf_greedy(peft_model, prompt)[0]
    actual = generate(ours, prompt[0], NEW_TOKENS, temperature=0.0)
    assert not torch.equal(expected, base_output)
    assert varied(expected[8:])
    # Ours against PEFT's decoding (other kernels): equal ids up to near-ties of PEFT's logits.
    assert_greedy_tokens(actual, expected, logits_of(peft_model), prompt_length=8)


# 2. Sampling ------------------------------------------------------------------------------------------

def test_sampling_is_reproducible_with_a_seed():
    model = lit_from_hf(make_hf_llama())
    prompt = torch.randint(0, 256, (5,))
    def sample(seed, **settings):
        torch.manual_seed(seed)
        return generate(model, prompt, 30, temperature=1.0, **settings)
    first, again, other = sample(0), sample(0), sample(1)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    generator = torch.Generator().manual_seed(7)
    with_generator = generate(model, prompt, 30, temperature=1.0, top_k=20, top_p=0.9, generator=generator)
    generator.manual_seed(7)
    assert torch.equal(generate(model, prompt, 30, temperature=1.0, top_k=20, top_p=0.9, generator=generator), with_generator)


def test_top_k_and_top_p_on_hand_made_logits():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0, -1.0]])
    keep = lambda filtered: (filtered[0] > float("-inf")).tolist()
    assert keep(top_k_filter(logits, 2)) == [False, True, True, False, False]
    assert keep(top_k_filter(logits, 1)) == [False, True, False, False, False]
    assert keep(top_k_filter(logits, 99)) == [True] * 5
    assert torch.equal(top_k_filter(logits, 2)[0, 1:3], logits[0, 1:3])  # kept logits are untouched

    probs = torch.tensor([[0.05, 0.5, 0.3, 0.15]])  # ranked: 0.5, 0.3, 0.15, 0.05
    logits = probs.log()
    assert keep(top_p_filter(logits, 0.5)) == [False, True, False, False]  # the top token alone reaches 0.5
    assert keep(top_p_filter(logits, 0.7)) == [False, True, True, False]  # 0.5 + 0.3 >= 0.7
    assert keep(top_p_filter(logits, 0.81)) == [False, True, True, True]
    assert keep(top_p_filter(logits, 1.0)) == [True] * 4
    assert keep(top_p_filter(logits, 0.01)) == [False, True, False, False]  # never empty
    two_rows = torch.cat([logits, logits.flip(-1)])
    assert keep(top_p_filter(two_rows, 0.7)[1:]) == [False, True, True, False]  # per row, in vocabulary order

    generator = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_next_token(logits.expand(64, -1), 1.0, top_k=2, generator=generator) for _ in range(20)])
    assert set(draws.unique().tolist()) == {1, 2}
    draws = torch.stack([sample_next_token(logits.expand(64, -1), 1.0, top_p=0.7, generator=generator) for _ in range(20)])
    assert set(draws.unique().tolist()) == {1, 2}
    assert (sample_next_token(logits, 0.0) == 1).all()  # temperature 0: greedy
    # A low temperature concentrates the mass on the top token, a high one spreads it.
    cold = sample_next_token(logits.expand(2000, -1), 0.2, generator=generator)
    hot = sample_next_token(logits.expand(2000, -1), 5.0, generator=generator)
    assert (cold == 1).float().mean() > 0.9 > 0.4 > (hot == 1).float().mean()


def test_bad_settings_are_clear_errors():
    model = Llama(Config.from_name("tiny", vocab_size=64, block_size=16))
    prompt = torch.zeros(3, dtype=torch.long)
    for settings, message in [(dict(temperature=-1.0), "temperature"), (dict(top_k=0), "top_k"),
                              (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p")]:
        with pytest.raises(ValueError, match=message):
            generate(model, prompt, 2, **settings)
    with pytest.raises(ValueError, match="non-empty"):
        generate(model, torch.zeros(0, dtype=torch.long), 2)


def test_dtype_choice_detects_bf16_at_run_time(monkeypatch):
    assert choose_dtype(torch.device("cpu"), "float32") == torch.float32
    monkeypatch.setattr("lit_lora.workflows.inference.cpu_supports_fast_bf16", lambda: False)
    assert choose_dtype(torch.device("cpu")) == torch.float32
    monkeypatch.setattr("lit_lora.workflows.inference.cpu_supports_fast_bf16", lambda: True)
    assert choose_dtype(torch.device("cpu")) == torch.bfloat16
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").is_file() else None
    if flags is not None:
        monkeypatch.undo()
        assert cpu_supports_fast_bf16() == ("avx512_bf16" in flags or "amx_bf16" in flags)


# 3. Streaming text ------------------------------------------------------------------------------------

def test_streaming_prints_exactly_the_decoded_text(llama2_tokenizer_path):
    tokenizer = Tokenizer(llama2_tokenizer_path)
    prompt = tokenizer.encode("Say:", bos=True)
    answer = tokenizer.encode("Hello world, café € 😀 ok", bos=False)  # byte-fallback pieces for the emoji
    out = io.StringIO()
    streamer = TextStreamer(tokenizer, prompt, file=out)
    seen = []
    for token in answer:
        streamer(token[None])
        seen.append(out.getvalue())
        assert "\ufffd" not in seen[-1]  # half an emoji is never printed
    text = streamer.finish()
    assert text == " Hello world, café € 😀 ok"  # the space that joins it to the prompt is kept
    assert out.getvalue() == text + "\n"
    assert tokenizer.decode(torch.cat([prompt, answer])) == "Say:" + text
    assert len(set(seen)) > 5  # printed piece by piece, not all at the end
    after_bos = TextStreamer(tokenizer, torch.tensor([tokenizer.bos_id]), file=io.StringIO())
    for token in answer:
        after_bos(token[None])
    assert after_bos.finish() == "Hello world, café € 😀 ok"  # a response after the template starts clean


# 4. The scripts, end to end ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, llama2_tokenizer_path):
    """A tiny random Llama with the real 32k tokenizer, one LoRA adapter and one LLaMA-Adapter for it."""
    root = tmp_path_factory.mktemp("generate")
    torch.manual_seed(0)
    config = Config.from_name("tiny", vocab_size=32000, block_size=96)
    model = Llama(config)
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 1.0)  # confident logits: a varied greedy answer
    save_checkpoint(root / "base", model.state_dict(), config, tokenizer_path=llama2_tokenizer_path)
    for seed in (1, 2):
        add_lora(model, LoRAConfig(r=4, alpha=8, targets=("q", "v", "head")))
        randomize([p for layer in lora_layers(model).values() for p in (layer.lora_A, layer.lora_B)], seed=seed, std=0.3)
        save_weights(root / f"lora{seed}.safetensors", model, "lora", LoRAConfig(r=4, alpha=8, targets=("q", "v", "head")))
        remove_lora(model)
    add_adapter(model, AdapterConfig(prompt_length=4, start_layer=1))
    randomize([model.layers[1].attn.adapter.prompt, model.layers[1].attn.adapter.gate], seed=3, std=1.0)
    save_weights(root / "adapter.safetensors", model, "adapter", AdapterConfig(prompt_length=4, start_layer=1))
    return root


def expected_response(checkpoint, instruction, attach):
    """The greedy answer computed here, in-process, with the library alone."""
    model = load_checkpoint(checkpoint / "base").eval()
    attach(model)
    tokenizer = Tokenizer(checkpoint / "base" / "tokenizer.model")
    prompt_ids = tokenizer.encode(get_prompt_style("alpaca").format(instruction), bos=True)
    output = generate(model, prompt_ids, 20, temperature=0.0, eos_id=tokenizer.eos_id)
    return tokenizer.decode(output[len(prompt_ids):])


def merged_lora(path):
    def attach(model):
        apply_weights(model, path)
        merge_lora(model)
    return attach


def test_lora_script_prints_the_response_from_the_command_line(tiny_checkpoint):
    instruction = "Name a colour."
    expected = {seed: expected_response(tiny_checkpoint, instruction, merged_lora(tiny_checkpoint / f"lora{seed}.safetensors"))
                for seed in (1, 2)}
    assert expected[1] != expected[2] and len(expected[1]) > 10
    command = [sys.executable, str(ROOT / "generate" / "lora.py"), "--checkpoint_dir", str(tiny_checkpoint / "base"),
               "--prompt", instruction, "--temperature", "0", "--max_new_tokens", "20", "--dtype", "float32"]
    single = subprocess.run(command + ["--lora_path", str(tiny_checkpoint / "lora1.safetensors")],
                            capture_output=True, text=True, timeout=120)
    assert single.returncode == 0, single.stderr
    assert single.stdout == expected[1] + "\n"  # only the response: stdout pipes cleanly
    assert "time to first token" in single.stderr and "tokens/s" in single.stderr and "peak RSS" in single.stderr

    # Several adapters on one base, unmerged: each answers as it does alone.
    several = generate_script("lora")(checkpoint_dir=tiny_checkpoint / "base", prompt=instruction, temperature=0.0,
                                      max_new_tokens=20, dtype="float32", merge=False,
                                      lora_path=[tiny_checkpoint / "lora1.safetensors", tiny_checkpoint / "lora2.safetensors",
                                                 tiny_checkpoint / "lora1.safetensors"])
    assert several == [expected[1], expected[2], expected[1]]


def test_scripts_answer_a_file_of_prompts_in_batches_as_each_alone(tiny_checkpoint, tmp_path, capsys):
    instructions = ["Name a colour.", "Write a very long story about a cat and a dog and a mouse.", "Hi", "Count to three."]
    (tmp_path / "prompts.txt").write_text("\n".join(instructions) + "\n\n")
    lora = tiny_checkpoint / "lora1.safetensors"
    alone = [expected_response(tiny_checkpoint, instruction, merged_lora(lora)) for instruction in instructions]
    answers = generate_script("lora")(checkpoint_dir=tiny_checkpoint / "base", prompts_file=tmp_path / "prompts.txt",
                                      lora_path=lora, temperature=0.0, max_new_tokens=20, dtype="float32", batch_size=3)
    assert answers == alone  # batched (left-padded, each stopping at its own EOS) = one at a time
    captured = capsys.readouterr()
    assert all(f"### prompt {i + 1}\n{answer}\n" in captured.out for i, answer in enumerate(alone))
    assert "4 prompts in batches of up to 3" in captured.err

    (tmp_path / "prompts.json").write_text(json.dumps(["Once upon a time", "The capital of\nFrance is"]))
    continued = generate_script("base")(checkpoint_dir=tiny_checkpoint / "base", prompts_file=tmp_path / "prompts.json",
                                        temperature=0.0, max_new_tokens=10, dtype="float32")
    assert continued[0] == generate_script("base")(checkpoint_dir=tiny_checkpoint / "base", prompt="Once upon a time",
                                                   temperature=0.0, max_new_tokens=10, dtype="float32")
    assert continued[1].startswith("The capital of\nFrance is")
    (tmp_path / "bad.json").write_text('{"prompt": "x"}')
    with pytest.raises(ValueError, match="must hold a JSON list of non-empty strings"):
        generate_script("base")(checkpoint_dir=tiny_checkpoint / "base", prompts_file=tmp_path / "bad.json")


def test_lora_script_merged_answers_survive_switching_adapters(tiny_checkpoint, capsys):
    paths = [tiny_checkpoint / "lora2.safetensors", tiny_checkpoint / "lora1.safetensors", tiny_checkpoint / "lora2.safetensors"]
    answers = generate_script("lora")(checkpoint_dir=tiny_checkpoint / "base", prompt="Name a colour.", temperature=0.0,
                                      max_new_tokens=20, dtype="float32", lora_path=paths)
    first, second, third = answers
    assert first == third != second  # unmerging gives the base weights back
    out = capsys.readouterr().out
    assert out.count("### ") == 3 and out.startswith(f"### {paths[0]}\n{first}\n### {paths[1]}\n{second}\n")


def test_adapter_script_prints_the_response(tiny_checkpoint, capsys):
    expected = expected_response(tiny_checkpoint, "Name a colour.",
                                 lambda m: apply_weights(m, tiny_checkpoint / "adapter.safetensors"))
    answers = generate_script("adapter")(checkpoint_dir=tiny_checkpoint / "base", prompt="Name a colour.",
                                         adapter_path=tiny_checkpoint / "adapter.safetensors", temperature=0.0,
                                         max_new_tokens=20, dtype="float32")
    assert answers == [expected]
    assert capsys.readouterr().out == expected + "\n"


def test_base_script_continues_the_prompt_and_refuses_a_prompt_too_long(tiny_checkpoint, capsys):
    text = generate_script("base")(checkpoint_dir=tiny_checkpoint / "base", prompt="Once upon a time",
                                   temperature=0.0, max_new_tokens=10, dtype="float32")
    captured = capsys.readouterr()
    assert captured.out == text + "\n" and text.startswith("Once upon a time") and len(text) > len("Once upon a time")
    assert "tokens/s" in captured.err and "tokens/s" not in captured.out

    result = subprocess.run([sys.executable, str(ROOT / "generate" / "base.py"), "--checkpoint_dir",
                             str(tiny_checkpoint / "base"), "--prompt", "word " * 200], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2
    assert re.fullmatch(r"error: the prompt is 2\d\d tokens long, but the model's context holds 96 tokens including "
                        r"the answer: shorten the prompt\n", result.stderr)  # one line, before any weight is read
    assert result.stdout == ""


def test_lora_script_on_a_4bit_base(tiny_checkpoint, capsys):
    """QLoRA inference: generate/lora.py --quantize nf4-dq keeps the adapter beside the 4-bit base."""
    from lit_lora.nf4 import Linear4bit
    from lit_lora.speed.quantize import load_checkpoint_quantized

    path = tiny_checkpoint / "lora1.safetensors"
    model = load_checkpoint_quantized(tiny_checkpoint / "base", mode="nf4-dq", dtype=torch.float32).eval()
    assert isinstance(model.layers[0].attn.k_proj, Linear4bit)
    apply_weights(model, path)
    tokenizer = Tokenizer(tiny_checkpoint / "base" / "tokenizer.model")
    prompt_ids = tokenizer.encode(get_prompt_style("alpaca").format("Name a colour."), bos=True)
    expected = tokenizer.decode(generate(model, prompt_ids, 20, temperature=0.0, eos_id=tokenizer.eos_id)[len(prompt_ids):])

    answers = generate_script("lora")(checkpoint_dir=tiny_checkpoint / "base", prompt="Name a colour.", lora_path=path,
                                      temperature=0.0, max_new_tokens=20, dtype="float32", quantize="nf4-dq")
    assert answers == [expected] and len(expected) > 10
    captured = capsys.readouterr()
    assert captured.out == expected + "\n" and "stays separate" in captured.err


def test_base_script_with_int8_weights_and_compiled(tiny_checkpoint, capsys):
    """--quantize int8 answers like an int8 model built here; --compile true gives the same greedy tokens."""
    from lit_lora.speed.int8 import Int8Linear
    from lit_lora.speed.quantize import load_checkpoint_quantized

    model = load_checkpoint_quantized(tiny_checkpoint / "base", mode="int8", dtype=torch.bfloat16, skip=()).eval()
    assert isinstance(model.lm_head, Int8Linear)
    tokenizer = Tokenizer(tiny_checkpoint / "base" / "tokenizer.model")
    prompt_ids = tokenizer.encode("Once upon a time", bos=True)
    expected = tokenizer.decode(generate(model, prompt_ids, 12, temperature=0.0, eos_id=tokenizer.eos_id)[len(prompt_ids):])
    for compile in (False, True):
        text = generate_script("base")(checkpoint_dir=tiny_checkpoint / "base", prompt="Once upon a time", temperature=0.0,
                                       max_new_tokens=12, dtype="bfloat16", quantize="int8", compile=compile)
        assert text == "Once upon a time" + expected, compile
        captured = capsys.readouterr()
        assert "linear layers in int8" in captured.err and ("compiled in" in captured.err) == compile


def test_compiled_decoding_gives_the_greedy_tokens_of_eager_decoding():
    """`CompiledDecoding` (one fixed-shape graph over the whole cache) against the plain `generate` lesson:
    one prompt, and prompts of different lengths in one left-padded batch, float32, with GQA."""
    from lit_lora.speed.decoding import CompiledDecoding

    hf = make_hf_llama(n_kv_heads=2)
    ours = lit_from_hf(hf)
    generator = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, hf.config.vocab_size, (n,), generator=generator) for n in (9, 4, 13)]
    compiled = CompiledDecoding(ours)
    alone = generate(ours, prompts[0], 30, temperature=0.0)
    assert_greedy_tokens(generate(compiled, prompts[0], 30, temperature=0.0), alone, logits_of(hf), prompt_length=9)
    together = generate(compiled, prompts, 30, temperature=0.0)
    for row, prompt in enumerate(prompts):
        assert_greedy_tokens(together[row], generate(ours, prompt, 30, temperature=0.0), logits_of(hf),
                             prompt_length=len(prompt))


def test_a_failing_compile_is_a_one_line_error(tiny_checkpoint, monkeypatch):
    from lit_lora.speed.decoding import compile_for_decoding

    def broken_compile(step, **kwargs):
        def compiled(*args, **kwargs):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\n(pages of traceback)")
        return compiled

    monkeypatch.setattr(torch, "compile", broken_compile)
    model = load_checkpoint(tiny_checkpoint / "base").eval()
    with pytest.raises(ValueError, match=r"^compiling the model failed \(RuntimeError: InvalidCxxCompiler: No working C\+\+ "
                                         r"compiler found\); run without --compile"):
        compile_for_decoding(model, torch.tensor([1, 2, 3]))


def test_generation_uses_the_prompt_style_recorded_in_the_adapter_file(tiny_checkpoint, tmp_path, capsys):
    """An adapter trained with another template is prompted with it, unless --prompt_style says otherwise."""
    from lit_lora.methods import read_weights
    from lit_lora.prompts import PROMPT_STYLES, PromptStyle, register_prompt_style

    style = register_prompt_style(PromptStyle("brackets", "[{instruction}] ->", "[{instruction} | {input}] ->"))
    try:
        weights = read_weights(tiny_checkpoint / "lora1.safetensors")
        model = load_checkpoint(tiny_checkpoint / "base")
        apply_weights(model, tiny_checkpoint / "lora1.safetensors")
        path = save_weights(tmp_path / "brackets.safetensors", model, "lora", weights.config,
                            training={"prompt_style": "brackets", "max_seq_length": 64})
        tokenizer = Tokenizer(tiny_checkpoint / "base" / "tokenizer.model")

        def answer(template):
            merged = load_checkpoint(tiny_checkpoint / "base").eval()
            apply_weights(merged, path)
            merge_lora(merged)
            prompt_ids = tokenizer.encode(template.format("Name a colour."), bos=True)
            return tokenizer.decode(generate(merged, prompt_ids, 20, temperature=0.0, eos_id=tokenizer.eos_id)[len(prompt_ids):])

        in_style, in_alpaca = answer(style), answer(get_prompt_style("alpaca"))
        assert in_style != in_alpaca
        run = lambda **kwargs: generate_script("lora")(checkpoint_dir=tiny_checkpoint / "base", prompt="Name a colour.",
                                                       lora_path=path, temperature=0.0, max_new_tokens=20,
                                                       dtype="float32", **kwargs)
        assert run() == [in_style]
        assert "prompt style brackets" in capsys.readouterr().err
        assert run(prompt_style="alpaca") == [in_alpaca]
    finally:
        PROMPT_STYLES.pop("brackets")
