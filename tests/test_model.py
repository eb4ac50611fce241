import time

import pytest
import torch

from conftest import lit_from_hf, make_hf_llama
from lit_lora.model import Config, Llama, apply_rope, naive_attention, rope_cos_sin


@pytest.mark.parametrize(("name", "expected"), [("7B", 6_738_415_616), ("13B", 13_015_864_320), ("70B", 68_976_648_192)])
def test_parameter_counts_on_meta_device(name, expected):
    start = time.perf_counter()
    with torch.device("meta"):
        model = Llama(Config.from_name(name))
    elapsed = time.perf_counter() - start
    assert sum(p.numel() for p in model.parameters()) == expected
    assert all(p.is_meta for p in model.parameters())
    assert elapsed < 10


def test_presets_and_config_round_trip():
    config = Config.from_name("70B")
    assert (config.n_kv_heads, config.head_size, config.intermediate_size) == (8, 128, 28672)
    assert Config.from_dict(config.to_dict()) == config
    # Meta's rule for the MLP width reproduces the published 7B/13B sizes.
    assert Config(n_embd=4096, n_head=32).intermediate_size == 11008
    assert Config(n_embd=5120, n_head=40).intermediate_size == 13824
    with pytest.raises(ValueError, match="unknown model name"):
        Config.from_name("8B")
    with pytest.raises(ValueError, match="divisible"):
        Config(n_embd=64, n_head=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="unknown Config fields"):
        Config.from_dict({"n_embd": 64, "dim": 3})


@pytest.mark.parametrize("n_kv_heads", [8, 2], ids=["MHA", "GQA"])
def test_logits_match_transformers(n_kv_heads):
    hf = make_hf_llama(n_head=8, n_kv_heads=n_kv_heads)
    ours = lit_from_hf(hf)
    for T in (1, 5, 33, 128):
        idx = torch.randint(0, hf.config.vocab_size, (2, T))
        with torch.no_grad():
            expected, actual = hf(idx).logits, ours(idx)
        assert expected.abs().max() > 1.0  # the comparison is not between near-zero logits
        torch.testing.assert_close(actual, expected, atol=1e-4, rtol=0)


def test_tied_embeddings_match_transformers():
    hf = make_hf_llama(tie=True)
    ours = lit_from_hf(hf)
    assert ours.lm_head.weight is ours.tok_embeddings.weight
    idx = torch.randint(0, hf.config.vocab_size, (1, 17))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), hf(idx).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("n_kv_heads", [4, 1], ids=["MHA", "MQA"])
def test_kv_cache_decoding_equals_full_forward(n_kv_heads):
    model = lit_from_hf(make_hf_llama(n_kv_heads=n_kv_heads))
    idx = torch.randint(0, model.config.vocab_size, (2, 50))
    model.set_kv_cache(batch_size=2, max_seq_length=64)
    with torch.no_grad():
        full = model(idx)
        pieces = [model(idx[:, :11], torch.arange(11))]  # prefill
        pieces += [model(idx[:, t : t + 1], torch.tensor([t])) for t in range(11, 50)]  # one token at a time
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-4, rtol=0)


def test_sdpa_equals_naive_attention():
    q, k, v = torch.randn(3, 2, 4, 9, 16).unbind(0)
    fast = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(naive_attention(q, k, v, mask=None), fast)


def test_rope_depends_only_on_relative_position():
    q, k = torch.randn(2, 32)
    def score(m, n):
        cos, sin = rope_cos_sin(torch.tensor([m, n]), 32, 10000.0, torch.float32)
        rq, rk = apply_rope(torch.stack([q, k]), cos, sin)[0]  # cos, sin: (1, T, hs)
        return rq @ rk
    assert torch.allclose(score(3, 1), score(12, 10), atol=1e-5)
    assert not torch.allclose(score(3, 1), score(3, 2), atol=1e-3)


def test_bad_inputs_are_clear_errors():
    model = Llama(Config.from_name("tiny", block_size=16, vocab_size=100))
    with pytest.raises(ValueError, match="exceeds the context length 16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(RuntimeError, match="set_kv_cache"):
        model(torch.zeros(1, 1, dtype=torch.long), torch.tensor([0]))
    model.set_kv_cache(1, 8)
    with pytest.raises(ValueError, match="do not fit the KV cache"):
        model(torch.zeros(1, 1, dtype=torch.long), torch.tensor([8]))
    with pytest.raises(ValueError, match="exceeds the model's context length"):
        model.set_kv_cache(1, 32)
