import math

import pytest
import torch
from conftest import assert_greedy_tokens, lit_from_hf, make_hf_llama

from lit_lora.adapter import (AdapterConfig, AdaptionPrompt, adapter_state_dict, add_adapter, load_adapter_state_dict,
                              mark_only_adapter_as_trainable, remove_adapter)
from lit_lora.files.checkpoint import CheckpointError, MethodFile, save_method_file
from lit_lora.files.utils import count_parameters
from lit_lora.methods import apply_weights, read_weights, save_weights
from lit_lora.model import Config, Llama


def randomise_adapters(model, seed=1):
    """Non-zero prompts and gates, different in every layer, so the adapter visibly changes the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in model.layers:
            if block.attn.adapter is not None:
                block.attn.adapter.prompt.copy_(torch.randn(block.attn.adapter.prompt.shape, generator=generator))
                block.attn.adapter.gate.copy_(torch.rand(1, generator=generator) + 0.5)


def adapted_tiny(n_kv_heads=2, n_layer=4, config=AdapterConfig(prompt_length=10, start_layer=2)):
    model = lit_from_hf(make_hf_llama(n_head=4, n_kv_heads=n_kv_heads, n_layer=n_layer))
    add_adapter(model, config)
    randomise_adapters(model)
    return model


@pytest.mark.parametrize(("name", "expected"), [("7B", 30 * 10 * 4096 + 30), ("13B", 38 * 10 * 5120 + 38),
                                                ("70B", 78 * 10 * 8192 + 78)])
def test_trainable_parameter_counts_on_meta_device(name, expected):
    assert {"7B": 1_228_830, "13B": 1_945_638, "70B": 6_389_838}[name] == expected
    with torch.device("meta"):
        model = Llama(Config.from_name(name))
    _, base_total = count_parameters(model)
    names = add_adapter(model, AdapterConfig(prompt_length=10, start_layer=2))
    trainable, total = mark_only_adapter_as_trainable(model)
    assert (trainable, total) == count_parameters(model)
    assert (trainable, total - base_total) == (expected, expected)
    assert names == [f"layers.{i}.attn" for i in range(2, model.config.n_layer)]
    assert all(p.is_meta for p in model.parameters())


@pytest.mark.parametrize("n_kv_heads", [4, 2], ids=["MHA", "GQA"])
def test_matches_peft_adaption_prompt(n_kv_heads):
    from peft import AdaptionPromptConfig, get_peft_model

    n_layer, start_layer, prompt_length = 4, 2, 10
    hf = make_hf_llama(n_head=4, n_kv_heads=n_kv_heads, n_layer=n_layer)
    ours = lit_from_hf(hf)
    idx = torch.randint(0, hf.config.vocab_size, (2, 13))
    with torch.no_grad():
        base_logits = ours(idx)
    add_adapter(ours, AdapterConfig(prompt_length=prompt_length, start_layer=start_layer))
    # PEFT counts adapted layers from the top: n_layer - start_layer of them.
    peft_config = AdaptionPromptConfig(adapter_len=prompt_length, adapter_layers=n_layer - start_layer,
                                       target_modules="self_attn", task_type="CAUSAL_LM")
    peft_model = get_peft_model(hf, peft_config)

    with torch.no_grad():  # zero gates (the initial state): exactly the base model, in both
        assert torch.equal(ours(idx), base_logits)
        torch.testing.assert_close(peft_model(idx).logits, base_logits, atol=1e-4, rtol=0)

    randomise_adapters(ours)
    hf_layers = peft_model.base_model.model.model.layers
    with torch.no_grad():
        for i in range(n_layer):
            peft_attn, adapter = hf_layers[i].self_attn, ours.layers[i].attn.adapter
            assert hasattr(peft_attn, "adaption_prompt") == (adapter is not None)
            if adapter is not None:
                peft_attn.adaption_prompt.copy_(adapter.prompt[None])  # PEFT's prompt is (1, L, C)
                peft_attn.adaption_gate.copy_(adapter.gate)
        expected, actual = peft_model(idx).logits, ours(idx)
    assert (actual - base_logits).abs().max() > 0.1  # the adapter matters, so the comparison can fail
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("n_kv_heads", [2, 1], ids=["GQA", "MQA"])
def test_prompt_attention_equals_hand_computation(n_kv_heads):
    """An independent check of the GQA path: explicit per-head loops, no repeat_interleave."""
    model = adapted_tiny(n_kv_heads=n_kv_heads)
    attn = model.layers[3].attn
    adapter = attn.adapter
    q = torch.randn(2, attn.n_head, 7, attn.head_size)
    with torch.no_grad():
        actual = adapter(q, attn)
        keys = adapter.prompt @ attn.k_proj.weight.T  # (L, nkv * hs)
        values = adapter.prompt @ attn.v_proj.weight.T  # (L, nkv * hs)
        expected = torch.empty_like(q)
        group = attn.n_head // attn.n_kv_heads
        for h in range(attn.n_head):
            kv = slice((h // group) * attn.head_size, (h // group + 1) * attn.head_size)
            weights = torch.softmax(q[:, h] @ keys[:, kv].T / math.sqrt(attn.head_size), dim=-1)  # (B, T, L)
            expected[:, h] = adapter.gate * weights @ values[:, kv]
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("n_kv_heads", [4, 2], ids=["MHA", "GQA"])
def test_kv_cache_decoding_equals_full_forward_and_projects_the_prompt_once(n_kv_heads):
    model = adapted_tiny(n_kv_heads=n_kv_heads)
    idx = torch.randint(0, model.config.vocab_size, (2, 30))
    prompt_projections = []
    for block in model.layers:  # the prompt is the only 2-D input (L, C) k_proj ever sees
        block.attn.k_proj.register_forward_hook(lambda module, args, out: prompt_projections.append(args[0].dim() == 2))
    with torch.no_grad():
        full = model(idx)
        prompt_projections.clear()  # without a KV cache the prompt is projected in every pass
        model.set_kv_cache(batch_size=2, max_seq_length=32)
        pieces = [model(idx[:, :7], torch.arange(7))]  # prefill
        pieces += [model(idx[:, t : t + 1], torch.tensor([t])) for t in range(7, 30)]  # one token at a time
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-4, rtol=0)
    assert sum(prompt_projections) == 2  # once per adapted layer in all 24 passes on the KV cache
    with torch.no_grad():
        model.clear_kv_cache()
        model.layers[2].attn.adapter.gate.zero_()
        assert (model(idx) - full).abs().max() > 1e-2  # the adapter is active in this test


def test_prompt_keys_are_computed_once_per_kv_cache_lifetime():
    model = adapted_tiny().eval()
    adapter, attn = model.layers[3].attn.adapter, model.layers[3].attn
    q = torch.randn(1, attn.n_head, 5, attn.head_size)
    projections = []
    attn.k_proj.register_forward_hook(lambda module, args, out: projections.append(1))

    def fresh():  # what the branch computes from the current weights
        L = adapter.prompt.size(0)
        kp = (adapter.prompt @ attn.k_proj.weight.T).view(1, L, attn.n_kv_heads, -1)
        vp = (adapter.prompt @ attn.v_proj.weight.T).view(1, L, attn.n_kv_heads, -1)
        group = attn.n_head // attn.n_kv_heads
        kp, vp = (t.transpose(1, 2).repeat_interleave(group, dim=1) for t in (kp, vp))
        return adapter.gate * torch.nn.functional.scaled_dot_product_attention(q, kp, vp)

    with torch.no_grad():
        adapter(q, attn), adapter(q, attn)
        assert len(projections) == 2  # no KV cache (training, scoring): projected in every call
        adapter.prompt.mul_(2.0)
        torch.testing.assert_close(adapter(q, attn), fresh(), atol=1e-6, rtol=0)

        model.set_kv_cache(batch_size=1, max_seq_length=8)
        projections.clear()
        first = adapter(q, attn)
        assert torch.equal(adapter(q, attn), first) and len(projections) == 1  # kept for the cache's lifetime
        attn.v_proj.weight.add_(0.5)  # a change while the cache lives is not seen (documented) ...
        assert torch.equal(adapter(q, attn), first)
        model.set_kv_cache(batch_size=1, max_seq_length=8)  # ... but a new cache starts afresh
        torch.testing.assert_close(adapter(q, attn), fresh(), atol=1e-6, rtol=0)
        assert (adapter(q, attn) - first).abs().max() > 1e-3 and len(projections) == 2
        model.clear_kv_cache()
        attn.v_proj.weight.add_(0.5)
        torch.testing.assert_close(adapter(q, attn), fresh(), atol=1e-6, rtol=0)


def test_generate_sees_lora_changes_on_the_projections_between_calls():
    """LoRA on k_proj/v_proj changes the prompt's keys/values: `generate` sets a new KV cache per call, so
    toggling or merging LoRA between calls is seen, exactly as by a forward pass without cache."""
    from lit_lora.generate import generate
    from lit_lora.lora import LoRAConfig, add_lora, merge_lora

    model = adapted_tiny()
    lora_layers = add_lora(model, LoRAConfig(r=2, alpha=4, dropout=0.0, targets=("k", "v")))
    model.eval()
    with torch.no_grad():
        for block in model.layers:
            block.attn.k_proj.lora_B.normal_()
            block.attn.v_proj.lora_B.normal_()
    prompt = torch.randint(0, model.config.vocab_size, (6,))

    def greedy_without_cache(steps=8):
        ids = prompt.clone()
        with torch.no_grad():
            for _ in range(steps):
                ids = torch.cat([ids, model(ids[None])[0, -1].argmax()[None]])
        return ids

    # generate (KV cache, one token a pass) and greedy_without_cache (full passes) are two computation
    # paths: the same ids, except that a near-tie of the logits (within 1e-4) may break either way.
    def assert_same_greedy(actual):
        assert_greedy_tokens(actual, greedy_without_cache(), lambda ids: model(ids[None])[0], len(prompt))

    with_lora = generate(model, prompt, 8, temperature=0.0)
    assert_same_greedy(with_lora)
    for block in model.layers:
        block.attn.k_proj.disabled = block.attn.v_proj.disabled = True
    without_lora = generate(model, prompt, 8, temperature=0.0)
    assert_same_greedy(without_lora)
    assert not torch.equal(without_lora, with_lora)
    for block in model.layers:
        block.attn.k_proj.disabled = block.attn.v_proj.disabled = False
    merge_lora(model)
    assert_same_greedy(generate(model, prompt, 8, temperature=0.0))
    assert len(lora_layers) == 2 * model.config.n_layer


def test_only_adapter_parameters_get_gradients():
    model = lit_from_hf(make_hf_llama(n_kv_heads=2, n_layer=4))
    add_adapter(model, AdapterConfig(prompt_length=10, start_layer=2))
    mark_only_adapter_as_trainable(model)
    idx = torch.randint(0, model.config.vocab_size, (2, 9))

    def backward():
        model.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten()).backward()

    backward()  # zero-init: only the gates move at first; the prompts' gradient is exactly 0
    for name, param in model.named_parameters():
        if ".adapter." not in name:
            assert param.grad is None and not param.requires_grad, name
        elif name.endswith("gate"):
            assert param.grad.abs().item() > 0, name
        else:
            assert torch.count_nonzero(param.grad) == 0, name
    randomise_adapters(model)
    backward()  # once the gates are open, the prompts learn too
    adapter_grads = {name: p.grad.clone() for name, p in model.named_parameters() if ".adapter." in name}
    assert len(adapter_grads) == 4 and all(g.abs().max() > 0 for g in adapter_grads.values())
    assert all(p.grad is None for name, p in model.named_parameters() if ".adapter." not in name)
    # Gradient accumulation (eval mode, unchanged weights): the second pass must build its own graph.
    torch.nn.functional.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten()).backward()
    for name, param in model.named_parameters():
        if ".adapter." in name:
            torch.testing.assert_close(param.grad, 2 * adapter_grads[name])


def test_remove_adapter_restores_the_base_model():
    model = lit_from_hf(make_hf_llama(n_kv_heads=2, n_layer=4))
    idx = torch.randint(0, model.config.vocab_size, (1, 11))
    with torch.no_grad():
        base = model(idx)
        names = add_adapter(model, AdapterConfig(prompt_length=3, start_layer=1))
        randomise_adapters(model)
        assert (model(idx) - base).abs().max() > 1e-2
        with pytest.raises(ValueError, match="already has adapters"):
            add_adapter(model, AdapterConfig())
        removed = remove_adapter(model)
        assert list(removed) == names == ["layers.1.attn", "layers.2.attn", "layers.3.attn"]
        assert all(isinstance(module, AdaptionPrompt) for module in removed.values())
        assert torch.equal(model(idx), base)
    assert adapter_state_dict(model) == {} and remove_adapter(model) == {}
    assert set(model.state_dict()) == set(lit_from_hf(make_hf_llama(n_kv_heads=2, n_layer=4)).state_dict())


def test_bad_settings_give_clear_errors():
    model = lit_from_hf(make_hf_llama(n_layer=3))
    with pytest.raises(ValueError, match="prompt_length must be a positive integer"):
        AdapterConfig(prompt_length=0)
    with pytest.raises(ValueError, match="start_layer must be a non-negative integer"):
        AdapterConfig(start_layer=-1)
    with pytest.raises(ValueError, match="start_layer 3 leaves no layer to adapt: the model has 3 layers"):
        add_adapter(model, AdapterConfig(start_layer=3))
    with pytest.raises(ValueError, match="no adapter to train"):
        mark_only_adapter_as_trainable(model)
    with pytest.raises(CheckpointError, match="the model has no adapter"):
        load_adapter_state_dict(model, {})


def test_loading_a_state_of_other_settings_is_a_clear_error():
    model = adapted_tiny(config=AdapterConfig(prompt_length=10, start_layer=2))
    other_length = adapter_state_dict(adapted_tiny(config=AdapterConfig(prompt_length=5, start_layer=2)))
    other_layers = adapter_state_dict(adapted_tiny(config=AdapterConfig(prompt_length=10, start_layer=1)))
    before = {k: v.clone() for k, v in adapter_state_dict(model).items()}
    with pytest.raises(CheckpointError, match=r"run 7 does not match the model: wrong shapes: "
                                              r"layers.2.attn.adapter.prompt \(5, 64\) != expected \(10, 64\)"):
        load_adapter_state_dict(model, other_length, source="run 7")
    with pytest.raises(CheckpointError, match="unexpected 2 keys: layers.1.attn.adapter.gate, layers.1.attn.adapter.p"):
        load_adapter_state_dict(model, other_layers)
    assert all(torch.equal(before[k], v) for k, v in adapter_state_dict(model).items())  # nothing half-loaded


def test_checkpoint_round_trip(tmp_path):
    hf = make_hf_llama(n_kv_heads=2, n_layer=4)
    trained = lit_from_hf(hf)
    config = AdapterConfig(prompt_length=6, start_layer=1)
    add_adapter(trained, config)
    randomise_adapters(trained)
    path = save_weights(tmp_path / "adapter.safetensors", trained, "adapter", config,
                        training={"prompt_style": "alpaca", "max_seq_length": 12})

    loaded = read_weights(path)
    assert loaded.method.name == "adapter" and loaded.config == config and loaded.model_config == trained.config
    assert loaded.training == {"prompt_style": "alpaca", "max_seq_length": 12}  # the file describes its training
    assert sorted(loaded.tensors) == sorted(adapter_state_dict(trained))
    assert [p.name for p in tmp_path.iterdir()] == ["adapter.safetensors"]  # no temp files left behind

    fresh = lit_from_hf(hf)
    assert apply_weights(fresh, path, "adapter").config == config
    idx = torch.randint(0, hf.config.vocab_size, (2, 12))
    with torch.no_grad():
        expected = trained(idx)
        assert torch.equal(fresh(idx), expected)  # the same tensors in the same kind of model: bit for bit

    # Cheap loading: base and adapter built on the meta device, every tensor assigned from the files.
    # Assigned tensors may sit at other memory alignments, so the kernels may take another path: a tolerance.
    with torch.device("meta"):
        lazy = Llama(trained.config)
    apply_weights(lazy, path)
    lazy.load_state_dict(lit_from_hf(hf).state_dict(), strict=False, assign=True)
    assert not any(p.is_meta for p in lazy.parameters())
    with torch.no_grad():
        torch.testing.assert_close(lazy.eval()(idx), expected, atol=1e-4, rtol=1e-5)


def test_checkpoint_errors(tmp_path):
    config = AdapterConfig(prompt_length=4, start_layer=2)
    trained = adapted_tiny(n_layer=4, config=config)
    path = save_weights(tmp_path / "adapter.safetensors", trained, "adapter", config)

    other_base = lit_from_hf(make_hf_llama(n_kv_heads=2, n_layer=4, hidden_size=32))
    with pytest.raises(CheckpointError, match=r"trained on a different base model: n_embd=64 \(model has 32\)"):
        apply_weights(other_base, path)
    assert adapter_state_dict(other_base) == {}  # the model is left untouched

    with pytest.raises(CheckpointError, match="model's adapter"):  # the settings must describe the model's adapter
        save_weights(tmp_path / "wrong.safetensors", trained, "adapter", AdapterConfig(prompt_length=4, start_layer=1))
    assert not (tmp_path / "wrong.safetensors").exists()

    state = adapter_state_dict(trained)
    lying = save_method_file(tmp_path / "lying.safetensors",
                             MethodFile("adapter", {"prompt_length": 5, "start_layer": 2}, trained.config, state))
    with pytest.raises(CheckpointError, match=r"lying.safetensors \(checked against its header's settings\) "
                                              r"does not match the model: wrong"):
        read_weights(lying)
    unknown = save_method_file(tmp_path / "unknown.safetensors", MethodFile("adapter", {"prompt_len": 4}, trained.config, state))
    with pytest.raises(CheckpointError, match="invalid adapter settings"):
        read_weights(unknown)
    lora = save_method_file(tmp_path / "lora.safetensors", MethodFile("lora", {}, trained.config, state))
    with pytest.raises(CheckpointError, match="holds a 'lora' adapter, not 'adapter'"):
        apply_weights(lit_from_hf(make_hf_llama(n_kv_heads=2, n_layer=4)), lora, "adapter")
    (tmp_path / "corrupt.safetensors").write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        read_weights(tmp_path / "corrupt.safetensors")


def test_adapter_follows_model_dtype():
    model = lit_from_hf(make_hf_llama(n_layer=3)).to(torch.bfloat16)
    add_adapter(model, AdapterConfig(prompt_length=2, start_layer=2))
    adapter = model.layers[2].attn.adapter
    assert adapter.prompt.dtype == adapter.gate.dtype == torch.bfloat16
    assert adapter.gate.item() == 0.0 and adapter.prompt.std() > 0.5  # N(0, 1) prompts, zero gate
    with torch.no_grad():
        assert model(torch.randint(0, 256, (1, 4))).dtype == torch.bfloat16
