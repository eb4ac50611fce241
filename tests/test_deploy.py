"""Deployment to llama.cpp (howto/deploy.md), where llama.cpp is installed: the `llama_cpp` Python module
(pip install llama-cpp-python) and a llama.cpp source tree with its converters in $LLAMA_CPP_DIR."""

import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import add_random_lora, assert_greedy_tokens

from lit_lora.files.checkpoint import load_checkpoint, save_checkpoint
from lit_lora.generate import generate
from lit_lora.methods import apply_weights, save_weights
from lit_lora.model import Config, Llama


ROOT = Path(__file__).resolve().parents[1]
LLAMA_CPP_DIR = Path(os.environ.get("LLAMA_CPP_DIR", "llama.cpp"))


@pytest.fixture(scope="module")
def llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        pytest.skip("llama.cpp not installed (pip install llama-cpp-python)")
    if not (LLAMA_CPP_DIR / "convert_hf_to_gguf.py").is_file():
        pytest.skip(f"no llama.cpp source tree at {LLAMA_CPP_DIR} (set LLAMA_CPP_DIR to use its converters)")
    return llama_cpp


def _script(name):
    return runpy.run_path(str(ROOT / "scripts" / f"{name}.py"))["main"]


def _convert(converter, *arguments):
    result = subprocess.run([sys.executable, str(LLAMA_CPP_DIR / converter), *map(str, arguments)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def _llama_cpp_greedy(llama_cpp, gguf, prompt_ids, new_tokens, lora=None):
    model = llama_cpp.Llama(model_path=str(gguf), lora_path=str(lora) if lora else None, n_ctx=256, n_threads=2,
                            verbose=False)
    generated = []
    for token in model.generate(prompt_ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
        generated.append(token)
        if len(generated) == new_tokens:
            break
    return torch.tensor(prompt_ids + generated)


def test_merged_and_unmerged_lora_give_the_same_greedy_tokens_in_llama_cpp(llama_cpp, llama2_tokenizer_path, tmp_path):
    torch.manual_seed(0)
    config = Config.from_name("tiny", vocab_size=32000, block_size=256)
    model = Llama(config)
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 1.0)  # confident logits: few near-ties
    save_checkpoint(tmp_path / "base", model.state_dict(), config, tokenizer_path=llama2_tokenizer_path)
    lora_config = add_random_lora(model)
    save_weights(tmp_path / "lora.safetensors", model, "lora", lora_config)

    # the journey of howto/deploy.md: merge, export to Hugging Face, convert to GGUF
    _script("merge_lora")(checkpoint_dir=tmp_path / "base", lora_path=tmp_path / "lora.safetensors",
                          output_dir=tmp_path / "merged")
    _script("convert_lit_checkpoint")(checkpoint_dir=tmp_path / "merged", output_dir=tmp_path / "merged-hf")
    _convert("convert_hf_to_gguf.py", tmp_path / "merged-hf", "--outtype", "f32", "--outfile", tmp_path / "merged.gguf")

    ours = load_checkpoint(tmp_path / "merged").eval()
    prompt = [1, 450, 7483, 310, 3444, 338]  # BOS "The capital of France is"
    expected = generate(ours, torch.tensor(prompt), 24, temperature=0.0)
    theirs = _llama_cpp_greedy(llama_cpp, tmp_path / "merged.gguf", prompt, 24)
    assert_greedy_tokens(theirs, expected, lambda ids: ours(ids[None])[0], prompt_length=len(prompt))

    # unmerged: the base in GGUF plus the adapter exported to PEFT and converted by convert_lora_to_gguf.py
    _script("convert_lit_checkpoint")(checkpoint_dir=tmp_path / "base", output_dir=tmp_path / "base-hf")
    _convert("convert_hf_to_gguf.py", tmp_path / "base-hf", "--outtype", "f32", "--outfile", tmp_path / "base.gguf")
    _script("export_peft")(lora_path=tmp_path / "lora.safetensors", output_dir=tmp_path / "peft")
    _convert("convert_lora_to_gguf.py", tmp_path / "peft", "--base", tmp_path / "base-hf", "--outtype", "f32",
             "--outfile", tmp_path / "lora.gguf")
    unmerged = load_checkpoint(tmp_path / "base").eval()
    apply_weights(unmerged, tmp_path / "lora.safetensors")
    expected = generate(unmerged, torch.tensor(prompt), 24, temperature=0.0)
    theirs = _llama_cpp_greedy(llama_cpp, tmp_path / "base.gguf", prompt, 24, lora=tmp_path / "lora.gguf")
    assert_greedy_tokens(theirs, expected, lambda ids: unmerged(ids[None])[0], prompt_length=len(prompt))
    base_only = _llama_cpp_greedy(llama_cpp, tmp_path / "base.gguf", prompt, 24)
    assert not torch.equal(base_only, theirs)  # the adapter is applied in llama.cpp, not ignored


@pytest.mark.slow
def test_gguf_finetune_gguf_round_trip_in_llama_cpp(llama_cpp, smollm2_checkpoint, tmp_path):
    """howto/deploy.md's round trip on the real SmolLM2 GGUF: imported, a LoRA merged in, exported to Hugging Face
    and converted back by llama.cpp, which then keeps the tokenizer and chat template and gives lit-lora's tokens."""
    import gguf
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    model = load_checkpoint(smollm2_checkpoint)
    lora_config = add_random_lora(model, targets=("q", "v"), std=0.02)
    save_weights(tmp_path / "lora.safetensors", model, "lora", lora_config)
    _script("merge_lora")(checkpoint_dir=smollm2_checkpoint, lora_path=tmp_path / "lora.safetensors",
                          output_dir=tmp_path / "merged")
    _script("convert_lit_checkpoint")(checkpoint_dir=tmp_path / "merged", output_dir=tmp_path / "merged-hf")
    _convert("convert_hf_to_gguf.py", tmp_path / "merged-hf", "--outtype", "f32", "--outfile", tmp_path / "merged.gguf")

    reader = gguf.GGUFReader(tmp_path / "merged.gguf")
    chat_template = AutoTokenizer.from_pretrained(str(tmp_path / "merged-hf")).chat_template
    assert reader.fields["tokenizer.ggml.pre"].contents() == "smollm"
    assert reader.fields["tokenizer.chat_template"].contents() == chat_template
    text = AutoTokenizer.from_pretrained(str(tmp_path / "merged-hf")).apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True)
    prompt = Tokenizer.from_file(str(smollm2_checkpoint / "tokenizer.json")).encode(text).ids
    vocab_only = llama_cpp.Llama(model_path=str(tmp_path / "merged.gguf"), vocab_only=True, verbose=False)
    assert vocab_only.tokenize(text.encode(), add_bos=False, special=True) == prompt

    ours = load_checkpoint(tmp_path / "merged").eval()
    expected = generate(ours, torch.tensor(prompt), 16, temperature=0.0)
    theirs = _llama_cpp_greedy(llama_cpp, tmp_path / "merged.gguf", prompt, 16)
    assert_greedy_tokens(theirs, expected, lambda ids: ours(ids[None])[0], prompt_length=len(prompt))
