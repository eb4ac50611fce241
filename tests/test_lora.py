import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from conftest import lit_from_hf, make_hf_llama

from lit_lora.files.checkpoint import (CheckpointError, MethodFile, load_checkpoint, save_checkpoint, save_json, save_method_file,
                                       save_tensors)
from lit_lora.files.hf_names import hf_to_lit_name, lit_to_hf_name
from lit_lora.files.utils import parameter_report
from lit_lora.lora import (LoRAConfig, LoRALinear, add_lora, load_lora_state_dict, lora_disabled, lora_layers, lora_state_dict,
                           mark_only_lora_as_trainable, merge_lora, remove_lora)
from lit_lora.methods import apply_weights, read_weights, save_weights
from lit_lora.model import Config, Llama
from lit_lora.workflows.peft import load_peft_adapter


ROOT = Path(__file__).resolve().parents[1]
ALL_TARGETS = ("q", "k", "v", "o", "mlp", "head")
# Written out here rather than derived from lit_lora, so a wrong mapping there fails the PEFT tests.
HF_TARGET_NAMES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
                   "gate": "gate_proj", "up": "up_proj", "down": "down_proj", "head": "lm_head"}


def script(name, folder="scripts"):
    """The `main` of <folder>/<name>.py, called in-process (no interpreter start per test)."""
    return runpy.run_path(str(ROOT / folder / f"{name}.py"))["main"]


def randomize_lora(model, seed=1, std=0.1):
    """Non-zero A and B large enough that the adapter moves the logits well above the tolerances."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=generator) * std)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * std)


def tiny_llama(n_kv_heads=2):
    """The same tiny GQA base model (3 layers, 4 query heads, 2 key/value heads) on every call."""
    return lit_from_hf(make_hf_llama(n_kv_heads=n_kv_heads))


def tiny_lora_llama(targets=("q", "v"), r=4, alpha=8.0, n_kv_heads=2):
    model = tiny_llama(n_kv_heads)
    config = LoRAConfig(r=r, alpha=alpha, dropout=0.0, targets=targets)
    add_lora(model, config)
    return model, config


# 1. Parameter counts on the meta device -------------------------------------------------------------

@pytest.mark.parametrize(("name", "expected"), [("7B", 4_194_304), ("13B", 6_553_600), ("70B", 16_384_000)])
def test_trainable_counts_on_meta_device(name, expected):
    with torch.device("meta"):
        model = Llama(Config.from_name(name))
    add_lora(model, LoRAConfig(r=8, alpha=16, targets=("q", "v")))
    trainable, total = mark_only_lora_as_trainable(model)
    assert trainable == expected
    assert all(p.is_meta for p in model.parameters())
    if name == "7B":
        assert total == 6_742_609_920
        assert parameter_report(model) == "trainable parameters: 4,194,304 of 6,742,609,920 (0.0622 %)"


def test_other_targets_count_r_times_in_plus_out():
    with torch.device("meta"):
        model = Llama(Config.from_name("7B"))
    replaced = add_lora(model, LoRAConfig(r=16, targets=("q", "k", "v", "o", "mlp")))
    trainable, _ = mark_only_lora_as_trainable(model)
    # per layer: four 4096 -> 4096 attention projections and three 4096 <-> 11008 MLP projections
    assert trainable == 32 * 16 * (4 * (4096 + 4096) + 3 * (4096 + 11008))
    assert len(replaced) == 32 * 7 and "lm_head" not in replaced
    assert LoRAConfig(targets="all").targets == ("q", "k", "v", "o", "gate", "up", "down", "head")


# 2. Parity with Hugging Face PEFT --------------------------------------------------------------------

def peft_twin(hf, ours, lora_config):
    """`hf` under peft.get_peft_model with the same settings, and `ours`'s A and B copied across."""
    from peft import LoraConfig, get_peft_model

    peft_config = LoraConfig(r=lora_config.r, lora_alpha=lora_config.alpha, lora_dropout=0.0,
                             target_modules=[HF_TARGET_NAMES[t] for t in lora_config.targets])
    peft_model = get_peft_model(hf, peft_config).eval()
    peft_layers = {name: m for name, m in peft_model.base_model.model.named_modules() if hasattr(m, "lora_A")}
    ours_layers = lora_layers(ours)
    assert len(peft_layers) == len(ours_layers)  # both wrapped the same modules
    with torch.no_grad():
        for name, layer in ours_layers.items():
            twin = peft_layers[lit_to_hf_name(name + ".weight").removesuffix(".weight")]
            twin.lora_A["default"].weight.copy_(layer.lora_A)
            twin.lora_B["default"].weight.copy_(layer.lora_B)
    return peft_model


@pytest.mark.parametrize("targets", [("q", "v"), ALL_TARGETS], ids=["qv", "all"])
@pytest.mark.parametrize("n_kv_heads", [4, 2], ids=["MHA", "GQA"])
def test_logits_and_merged_weights_match_peft(n_kv_heads, targets):
    hf = make_hf_llama(n_kv_heads=n_kv_heads)
    ours = lit_from_hf(hf)
    idx = torch.randint(0, hf.config.vocab_size, (2, 19))
    with torch.no_grad():
        base_logits = hf(idx).logits
    lora_config = LoRAConfig(r=4, alpha=8, dropout=0.0, targets=targets)
    add_lora(ours, lora_config)
    randomize_lora(ours)
    peft_model = peft_twin(hf, ours, lora_config)

    with torch.no_grad():
        expected, actual = peft_model(idx).logits, ours(idx)
        with lora_disabled(ours), peft_model.disable_adapter():
            torch.testing.assert_close(ours(idx), base_logits, atol=1e-4, rtol=0)
            torch.testing.assert_close(peft_model(idx).logits, base_logits, atol=1e-4, rtol=0)
    assert (expected - base_logits).abs().max() > 0.5  # the adapter really changes the model
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=0)

    merge_lora(ours)
    remove_lora(ours)
    merged_hf = peft_model.merge_and_unload()
    ours_state = ours.state_dict()
    for name, weight in merged_hf.state_dict().items():
        torch.testing.assert_close(ours_state[hf_to_lit_name(name)], weight, atol=1e-6, rtol=0)


@pytest.mark.parametrize(("n_kv_heads", "targets"), [(4, ("q", "v")), (2, ALL_TARGETS)], ids=["MHA-qv", "GQA-all"])
def test_export_and_import_peft(tmp_path, n_kv_heads, targets):
    from peft import PeftModel

    ours, lora_config = tiny_lora_llama(targets, n_kv_heads=n_kv_heads)
    randomize_lora(ours)
    idx = torch.randint(0, 256, (2, 13))
    with torch.no_grad():
        ours_logits = ours(idx)

    # lit-lora -> PEFT: PEFT's own loader on a fresh HF model with the same base weights.
    save_weights(tmp_path / "lora.safetensors", ours, "lora", lora_config)
    script("export_peft")(lora_path=tmp_path / "lora.safetensors", output_dir=tmp_path / "peft")
    peft_model = PeftModel.from_pretrained(make_hf_llama(n_kv_heads=n_kv_heads), str(tmp_path / "peft")).eval()
    with torch.no_grad():
        peft_logits = peft_model(idx).logits
    torch.testing.assert_close(peft_logits, ours_logits, atol=1e-4, rtol=0)

    # PEFT -> lit-lora, from PEFT's own writer (which adds a copy of lm_head when the head is a target).
    peft_model.save_pretrained(str(tmp_path / "peft_saved"))
    base_dir = save_checkpoint(tmp_path / "base", tiny_llama(n_kv_heads).state_dict(), ours.config)
    script("import_peft")(peft_dir=tmp_path / "peft_saved", checkpoint_dir=base_dir, output_path=tmp_path / "imported.safetensors")
    imported = read_weights(tmp_path / "imported.safetensors", "lora")
    imported_config, imported_state = imported.config, imported.tensors
    assert imported_config == lora_config
    original = lora_state_dict(ours)
    assert imported_state.keys() == original.keys()
    assert all(torch.equal(imported_state[k], original[k]) for k in original)
    model = load_checkpoint(base_dir)
    apply_weights(model, tmp_path / "imported.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(model(idx), peft_logits, atol=1e-4, rtol=0)


def test_import_peft_rejects_what_lora_linear_cannot_represent(tmp_path):
    config = Config.from_name("tiny", vocab_size=256)
    peft_dir = tmp_path / "peft"
    # DoRA, rsLoRA and per-layer ranks import (tests/test_lora_family.py); a bias on B does not
    save_json({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "lora_bias": True}, peft_dir / "adapter_config.json")
    with pytest.raises(CheckpointError, match="lora_bias=True"):
        load_peft_adapter(peft_dir, config)
    save_json({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "bias": "none", "modules_to_save": [],
               "rank_pattern": {}}, peft_dir / "adapter_config.json")
    (peft_dir / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(CheckpointError, match="safe_serialization"):
        load_peft_adapter(peft_dir, config)
    (peft_dir / "adapter_model.bin").unlink()
    with pytest.raises(CheckpointError, match="not found"):
        load_peft_adapter(peft_dir, config)
    save_tensors({"base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(4, 256)},
                 peft_dir / "adapter_model.safetensors")
    with pytest.raises(CheckpointError, match="'base_model.model.model.embed_tokens.lora_embedding_A' is not a LoRA weight"):
        load_peft_adapter(peft_dir, config)


# 3. LoRALinear behaviour -----------------------------------------------------------------------------

def test_zero_b_starts_at_the_base_model_and_only_lora_gets_gradients():
    hf = make_hf_llama()
    base = lit_from_hf(hf)
    model = lit_from_hf(hf)
    replaced = add_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.0, targets=ALL_TARGETS))
    assert all(type(m) is nn.Linear for m in replaced.values()) and len(replaced) == 3 * 7 + 1
    idx = torch.randint(0, 256, (2, 11))
    with torch.no_grad():
        assert torch.equal(model(idx), base(idx))  # B = 0: exactly the pretrained function

    mark_only_lora_as_trainable(model)
    model(idx).logsumexp(-1).mean().backward()
    for name, param in model.named_parameters():
        if name.endswith(("lora_A", "lora_B")):
            assert param.grad is not None, name
        else:
            assert param.grad is None, name
    for layer in lora_layers(model).values():
        assert layer.lora_B.grad.abs().sum() > 0  # B learns from the first step ...
        assert layer.lora_A.grad.abs().sum() == 0  # ... A only once B is non-zero (dL/dA = B^T ...)


def test_merge_unmerge_disable_and_remove():
    model, _ = tiny_lora_llama(ALL_TARGETS)
    original = {name: t.clone() for name, t in model.state_dict().items()}
    randomize_lora(model)
    idx = torch.randint(0, 256, (2, 11))
    with torch.no_grad():
        unmerged = model(idx)
        with lora_disabled(model):
            disabled = model(idx)
    base = tiny_llama()
    with torch.no_grad():
        torch.testing.assert_close(disabled, base(idx), atol=0, rtol=0)
    assert (unmerged - disabled).abs().max() > 0.5

    assert len(merge_lora(model)) == 22
    layer = model.layers[0].attn.q_proj
    assert (layer.base.weight - original["layers.0.attn.q_proj.base.weight"]).abs().max() > 0.1
    with torch.no_grad():
        torch.testing.assert_close(model(idx), unmerged, atol=1e-5, rtol=0)
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    with pytest.raises(RuntimeError, match="merged"):
        with lora_disabled(model):
            pass
    for layer in lora_layers(model).values():
        layer.unmerge()
    for name, t in model.state_dict().items():
        if not name.endswith(("lora_A", "lora_B")):
            torch.testing.assert_close(t, original[name], atol=1e-6, rtol=0)

    with pytest.raises(ValueError, match="already has LoRA layers"):
        add_lora(model, LoRAConfig())
    removed = remove_lora(model)
    assert len(removed) == 22 and not lora_layers(model)
    assert model.state_dict().keys() == base.state_dict().keys()  # original names again
    with torch.no_grad():
        torch.testing.assert_close(model(idx), base(idx), atol=1e-5, rtol=0)  # weights restored to ~1e-7


def test_forward_is_the_naive_formula_and_dropout_touches_only_the_lora_input():
    base = nn.Linear(24, 40)
    layer = LoRALinear(base, r=3, alpha=6, dropout=0.5)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(5, 7, 24)
    layer.eval()
    naive = x @ (base.weight + 2.0 * layer.lora_B @ layer.lora_A).T + base.bias
    torch.testing.assert_close(layer(x), naive, atol=1e-5, rtol=0)

    layer.train()
    torch.manual_seed(3)
    actual = layer(x)
    torch.manual_seed(3)  # the same dropout mask, applied by hand to the LoRA input only
    expected = base(x) + 2.0 * nn.functional.dropout(x, 0.5, training=True) @ layer.lora_A.T @ layer.lora_B.T
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


def test_kv_cache_decoding_with_lora_equals_full_forward():
    model, _ = tiny_lora_llama(ALL_TARGETS)
    randomize_lora(model)
    idx = torch.randint(0, 256, (2, 30))
    model.set_kv_cache(batch_size=2, max_seq_length=32)
    with torch.no_grad():
        full = model(idx)
        pieces = [model(idx[:, :7], torch.arange(7))]
        pieces += [model(idx[:, t : t + 1], torch.tensor([t])) for t in range(7, 30)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-4, rtol=0)


def test_lora_on_4bit_base_layers():
    from lit_lora.speed.quantize import quantize_model

    model = tiny_llama().to(torch.bfloat16)
    quantize_model(model, mode="nf4-dq")  # every Linear but lm_head becomes 4-bit
    add_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.0, targets=("q", "v", "head")))
    layers = lora_layers(model)
    assert all(layer.lora_A.dtype == torch.bfloat16 for layer in layers.values())  # compute dtype, not uint8
    randomize_lora(model)
    mark_only_lora_as_trainable(model)
    model(torch.randint(0, 256, (1, 7))).float().logsumexp(-1).mean().backward()
    assert all(layer.lora_A.grad is not None and layer.lora_B.grad is not None for layer in layers.values())
    head_before = model.lm_head.base.weight.clone()
    with pytest.raises(RuntimeError, match="merge_lora_quantized"):
        merge_lora(model)
    assert not any(layer.merged for layer in layers.values())  # refused before touching any layer
    assert torch.equal(model.lm_head.base.weight, head_before)


def test_bad_targets_are_clear_errors():
    tied = lit_from_hf(make_hf_llama(tie=True))
    with pytest.raises(ValueError, match="tied"):
        add_lora(tied, LoRAConfig(targets=("q", "head")))
    assert not lora_layers(tied)  # nothing was wrapped before the error
    with pytest.raises(ValueError, match="selects no nn.Linear"):
        add_lora(nn.Sequential(nn.Conv2d(3, 3, 1)), LoRAConfig(targets=("q",)))
    with pytest.raises(ValueError, match="rank r"):
        LoRAConfig(r=0)
    with pytest.raises(ValueError, match="dropout"):
        LoRAConfig(dropout=1.0)


def test_howto_example_runs():
    text = (ROOT / "howto" / "lora_any_model.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    exec(compile(code, "howto/lora_any_model.md", "exec"), {})


# Adapter checkpoints -------------------------------------------------------------------------------

def test_lora_checkpoint_round_trip_and_errors(tmp_path):
    model, lora_config = tiny_lora_llama(("q", "v", "down"))
    randomize_lora(model)
    path = save_weights(tmp_path / "lora.safetensors", model, "lora", lora_config)
    state = lora_state_dict(model)
    assert set(state) == {f"layers.{i}.{m}.{ab}" for i in range(3) for m in ("attn.q_proj", "attn.v_proj", "mlp.down_proj")
                          for ab in ("lora_A", "lora_B")}
    # Only the adapter is stored: the file is its tensors plus a small header.
    adapter_bytes = sum(t.numel() * t.element_size() for t in state.values())
    assert adapter_bytes < path.stat().st_size < adapter_bytes + 4096

    fresh = tiny_llama()
    assert apply_weights(fresh, path, "lora").config == lora_config
    idx = torch.randint(0, 256, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(fresh(idx), model(idx), atol=0, rtol=0)

    # A base with a different architecture: refused, and left without LoRA layers.
    other = Llama(Config.from_name("tiny", vocab_size=256))
    with pytest.raises(CheckpointError, match="different base model: .*n_layer=3"):
        apply_weights(other, path)
    assert not lora_layers(other)

    # Tensors that do not fit the settings in the header: wrong rank, a missing layer.
    wrong_rank = {**lora_config.to_dict(), "r": 8}
    save_method_file(tmp_path / "rank.safetensors", MethodFile("lora", wrong_rank, model.config, state))
    with pytest.raises(CheckpointError, match="wrong shapes: layers.0.attn.q_proj.lora_A"):
        read_weights(tmp_path / "rank.safetensors")
    missing = {k: v for k, v in state.items() if not k.startswith("layers.2.mlp")}
    save_method_file(tmp_path / "missing.safetensors", MethodFile("lora", lora_config.to_dict(), model.config, missing))
    with pytest.raises(CheckpointError, match="missing 2 keys: layers.2.mlp.down_proj.lora_A"):
        read_weights(tmp_path / "missing.safetensors")
    rank2, _ = tiny_lora_llama(("q", "v", "down"), r=2)
    with pytest.raises(CheckpointError, match="my adapter does not match the model: wrong shapes"):
        load_lora_state_dict(rank2, state, source="my adapter")
    (tmp_path / "corrupt.safetensors").write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        read_weights(tmp_path / "corrupt.safetensors")


def test_merge_script_writes_a_standalone_checkpoint(tmp_path):
    model, lora_config = tiny_lora_llama(ALL_TARGETS)
    randomize_lora(model)
    base_dir = save_checkpoint(tmp_path / "base", tiny_llama().state_dict(), model.config)
    (base_dir / "tokenizer.model").write_bytes(b"sentencepiece stand-in")
    save_weights(tmp_path / "lora.safetensors", model, "lora", lora_config)

    out = script("merge_lora")(checkpoint_dir=base_dir, lora_path=tmp_path / "lora.safetensors", output_dir=tmp_path / "merged")
    merged = load_checkpoint(out)
    assert not lora_layers(merged) and (out / "tokenizer.model").read_bytes() == b"sentencepiece stand-in"
    idx = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(merged(idx), model(idx), atol=1e-4, rtol=0)


def test_merge_script_errors_are_one_line(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "merge_lora.py"), "--checkpoint_dir", str(tmp_path / "nope"),
                             "--lora_path", str(tmp_path / "lora.safetensors"), "--output_dir", str(tmp_path / "out")],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {tmp_path / 'nope' / 'model_config.json'} not found: is "
                                                  f"{tmp_path / 'nope'} a lit-lora checkpoint? Convert one with "
                                                  "scripts/convert_hf_checkpoint.py"]


# 4. Sizes --------------------------------------------------------------------------------------------

def test_adapter_sizes_for_7b(capsys):
    sizes = script("lora_sizes", "benchmarks")(model_name="7B", r=8, targets=("q", "v"))
    assert sizes["adapter_fp32_bytes"] == 4 * 4_194_304  # 16.8 MB
    assert sizes["adapter_bf16_bytes"] == 2 * 4_194_304  # 8.4 MB
    assert sizes["base_bf16_bytes"] == 2 * 6_738_415_616  # 13.5 GB
    assert "16.8 MB fp32, 8.4 MB bf16" in capsys.readouterr().out


def test_lora_layers_take_the_mode_of_the_layer_they_wrap():
    model = Llama(Config.from_name("tiny", vocab_size=100)).eval()
    add_lora(model, LoRAConfig(r=2, dropout=0.5))
    x = torch.randint(0, 100, (1, 8))
    assert not any(m.training for m in model.modules())  # no dropout on an eval model's new LoRA branch
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x), atol=0, rtol=0)
