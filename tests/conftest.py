"""Shared fixtures: the real data beside the project, and tiny random Hugging Face Llamas as references."""

import math
import os
from pathlib import Path

import pytest
import torch

from lit_lora.hf_names import config_from_hf, hf_to_lit_name
from lit_lora.model import Llama

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


@pytest.fixture
def hf_llama_factory():
    return make_hf_llama
