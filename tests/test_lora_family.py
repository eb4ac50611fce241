"""DoRA, rsLoRA, per-layer ranks and alphas, and LoRA+, each against Hugging Face PEFT."""

import pytest
import torch
from conftest import lit_from_hf, make_hf_llama

from lit_lora.files.hf_names import hf_to_lit_name, lit_to_hf_name
from lit_lora.lora import LoRAConfig, add_lora, lora_layers, lora_lr_scale, mark_only_lora_as_trainable, merge_lora
from lit_lora.methods import apply_weights, save_weights
from lit_lora.model import Config, Llama


HF_NAMES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj",
            "down": "down_proj"}
ALL_LINEAR = ("q", "k", "v", "o", "gate", "up", "down")
VARIANTS = {
    "dora": dict(use_dora=True),
    "rslora": dict(use_rslora=True),
    "patterns": dict(rank_pattern={"layers.0.*": 2, "layers.2.attn.q_proj": 6}, alpha_pattern={"layers.1.*": 3.0}),
    "dora+rslora+patterns": dict(use_dora=True, use_rslora=True, rank_pattern={"layers.1.*": 2}),
}


def peft_settings(config: LoRAConfig):
    """The same settings for PEFT (the patterns are passed apart, as explicit module names)."""
    return dict(r=config.r, lora_alpha=config.alpha, lora_dropout=0.0, use_dora=config.use_dora,
                use_rslora=config.use_rslora, target_modules=[HF_NAMES[t] for t in config.targets])


def twins(n_kv_heads, targets, variant, seed=0):
    """Our adapted model and PEFT's on the same random base, with the same non-zero A, B (and magnitudes)."""
    from peft import LoraConfig, get_peft_model

    hf = make_hf_llama(n_kv_heads=n_kv_heads, seed=seed)
    ours = lit_from_hf(hf)
    config = LoRAConfig(r=4, alpha=8, dropout=0.0, targets=targets, **VARIANTS[variant])
    add_lora(ours, config)
    layers = lora_layers(ours)
    rank_pattern = {lit_to_hf_name(n + ".weight")[:-7]: l.r for n, l in layers.items() if l.r != config.r}
    alpha_pattern = {lit_to_hf_name(n + ".weight")[:-7]: l.alpha for n, l in layers.items() if l.alpha != config.alpha}
    peft_model = get_peft_model(hf, LoraConfig(**peft_settings(config), rank_pattern=rank_pattern,
                                               alpha_pattern=alpha_pattern))
    generator = torch.Generator().manual_seed(seed + 1)
    peft_layers = {name: m for name, m in peft_model.base_model.model.named_modules() if hasattr(m, "lora_A")}
    assert len(peft_layers) == len(layers)
    with torch.no_grad():
        for name, layer in layers.items():
            twin = peft_layers[lit_to_hf_name(name + ".weight")[:-7]]
            assert twin.scaling["default"] == pytest.approx(layer.scaling)  # rsLoRA and the patterns agree
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=generator) * 0.2)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * 0.2)
            twin.lora_A["default"].weight.copy_(layer.lora_A)
            twin.lora_B["default"].weight.copy_(layer.lora_B)
            if config.use_dora:
                torch.testing.assert_close(layer.lora_magnitude, twin.lora_magnitude_vector["default"].weight)  # both ||W||
                layer.lora_magnitude.mul_(1 + 0.3 * torch.rand(layer.lora_magnitude.shape, generator=generator))
                twin.lora_magnitude_vector["default"].weight.copy_(layer.lora_magnitude)
    return ours, peft_model, config


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("targets", [("q", "v"), ALL_LINEAR], ids=["qv", "all"])
@pytest.mark.parametrize("n_kv_heads", [4, 2], ids=["MHA", "GQA"])
def test_logits_gradients_and_merged_weights_equal_peft(n_kv_heads, targets, variant):
    ours, peft_model, config = twins(n_kv_heads, targets, variant)
    idx = torch.randint(0, 256, (2, 13))
    mark_only_lora_as_trainable(ours)
    ours.train(), peft_model.train()
    ours_logits, peft_logits = ours(idx), peft_model(idx).logits
    torch.testing.assert_close(ours_logits, peft_logits, atol=1e-4, rtol=0)

    # one backward pass on the same batch: the gradients of A, B (and the magnitudes) agree
    target = torch.randint(0, 256, (2, 13))
    torch.nn.functional.cross_entropy(ours_logits.flatten(0, 1), target.flatten()).backward()
    torch.nn.functional.cross_entropy(peft_logits.flatten(0, 1), target.flatten()).backward()
    peft_params = dict(peft_model.named_parameters())
    for name, layer in lora_layers(ours).items():
        prefix = "base_model.model." + lit_to_hf_name(name + ".weight")[:-7]
        pairs = [(layer.lora_A, f"{prefix}.lora_A.default.weight"), (layer.lora_B, f"{prefix}.lora_B.default.weight")]
        if config.use_dora:
            pairs.append((layer.lora_magnitude, f"{prefix}.lora_magnitude_vector.default.weight"))
        for mine, theirs in pairs:
            theirs_grad = peft_params[theirs].grad  # within 1e-5 of the gradient's size (float32 sums differ)
            torch.testing.assert_close(mine.grad, theirs_grad, rtol=1e-5, atol=1e-5 * float(theirs_grad.abs().max()))

    ours.eval()
    merge_lora(ours)
    merged = peft_model.merge_and_unload()
    ours_state = ours.state_dict()
    for name, weight in merged.state_dict().items():
        key = hf_to_lit_name(name)
        key = key if key in ours_state else key.replace(".weight", ".base.weight")
        torch.testing.assert_close(ours_state[key], weight, atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_adapters_with_these_options_round_trip_through_peft(tmp_path, variant):
    import runpy
    from pathlib import Path

    from peft import PeftModel

    from lit_lora.files.checkpoint import save_checkpoint
    from lit_lora.methods import read_weights

    root = Path(__file__).resolve().parents[1]
    ours, peft_model, config = twins(2, ALL_LINEAR, variant)
    idx = torch.randint(0, 256, (2, 11))
    with torch.no_grad():
        expected = ours.eval()(idx)
    save_weights(tmp_path / "ours.safetensors", ours, "lora", config)
    runpy.run_path(str(root / "scripts" / "export_peft.py"))["main"](lora_path=tmp_path / "ours.safetensors",
                                                                    output_dir=tmp_path / "exported")
    loaded = PeftModel.from_pretrained(make_hf_llama(n_kv_heads=2), str(tmp_path / "exported")).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx).logits, expected, atol=1e-4, rtol=0)

    peft_model.save_pretrained(str(tmp_path / "theirs"))  # PEFT's own writer, its own pattern keys
    base = save_checkpoint(tmp_path / "base", lit_from_hf(make_hf_llama(n_kv_heads=2)).state_dict(), ours.config)
    runpy.run_path(str(root / "scripts" / "import_peft.py"))["main"](peft_dir=tmp_path / "theirs", checkpoint_dir=base,
                                                                    output_path=tmp_path / "imported.safetensors")
    imported = read_weights(tmp_path / "imported.safetensors")
    assert imported.config.use_dora == config.use_dora and imported.config.use_rslora == config.use_rslora
    model = lit_from_hf(make_hf_llama(n_kv_heads=2)).eval()
    apply_weights(model, tmp_path / "imported.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(model(idx), peft_model.eval()(idx).logits, atol=1e-4, rtol=0)


def test_dora_trainable_count_for_7b_on_the_meta_device():
    with torch.device("meta"):
        model = Llama(Config.from_name("7B"))
    add_lora(model, LoRAConfig(r=8, alpha=16, targets=("q", "v"), use_dora=True))
    trainable, _ = mark_only_lora_as_trainable(model)
    assert trainable == 4_456_448 == 4_194_304 + 64 * 4096  # LoRA's plus a 4,096-entry magnitude per layer


def test_lora_plus_groups_and_one_adamw_step_equal_peft():
    from peft.optimizers import create_loraplus_optimizer

    from lit_lora.train import parameter_groups

    ours, peft_model, config = twins(2, ("q", "v"), "dora")
    config.lr_ratio = 16.0
    mark_only_lora_as_trainable(ours)
    idx, target = torch.randint(0, 256, (2, 9)), torch.randint(0, 256, (2, 9))
    for model, logits in ((ours, lambda: ours(idx)), (peft_model, lambda: peft_model(idx).logits)):
        torch.nn.functional.cross_entropy(logits().flatten(0, 1), target.flatten()).backward()
    groups = parameter_groups(ours, lambda name: lora_lr_scale(config, name))
    for group in groups:
        group["lr"] = 1e-3 * group["lr_scale"]
    before = {name: p.detach().clone() for name, p in ours.named_parameters() if p.requires_grad}
    torch.optim.AdamW(groups, lr=1e-3, weight_decay=0.0).step()
    peft_before = {name: p.detach().clone() for name, p in peft_model.named_parameters() if p.requires_grad}
    create_loraplus_optimizer(peft_model, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16.0, weight_decay=0.0).step()
    peft_params = dict(peft_model.named_parameters())
    suffixes = {"lora_A": "lora_A.default.weight", "lora_B": "lora_B.default.weight",
                "lora_magnitude": "lora_magnitude_vector.default.weight"}
    for name, param in ours.named_parameters():
        if not param.requires_grad:
            continue
        module, tensor = name.rsplit(".", 1)
        theirs = f"base_model.model.{lit_to_hf_name(module + '.weight')[:-7]}.{suffixes[tensor]}"
        torch.testing.assert_close(param - before[name], peft_params[theirs] - peft_before[theirs], atol=1e-6, rtol=0)
        if tensor != "lora_A":  # B and the magnitudes moved 16 times as far as with one learning rate
            assert (param - before[name]).abs().max() > 1e-2


def test_merged_dora_answers_like_unmerged_dora_and_peft():
    from lit_lora.generate import generate

    ours, peft_model, _ = twins(2, ALL_LINEAR, "dora")
    prompt = torch.randint(0, 256, (5,))
    unmerged = generate(ours.eval(), prompt, 12, temperature=0.0)
    merge_lora(ours)
    merged = generate(ours, prompt, 12, temperature=0.0)
    theirs = peft_model.merge_and_unload().eval().generate(prompt[None], max_new_tokens=12, do_sample=False,
                                                           min_new_tokens=12, pad_token_id=0)[0]
    from conftest import assert_greedy_tokens

    assert_greedy_tokens(merged, unmerged, lambda x: ours(x[None])[0], len(prompt))
    assert_greedy_tokens(merged, theirs, lambda x: ours(x[None])[0], len(prompt))


def test_dora_on_a_4bit_base_finetunes(tiny_run, tmp_path):
    from lit_lora.methods import finetune
    from lit_lora.train import TrainArgs

    def loss_drop(out, **arguments):
        metrics = finetune("lora", {"checkpoint_dir": tiny_run / "base", "data_dir": tiny_run / "data", "out_dir": out,
                                    "accelerator": "cpu", "lora": LoRAConfig(r=8, alpha=16, dropout=0.0, use_dora=True),
                                    "train": TrainArgs(learning_rate=2e-2, global_batch_size=8, micro_batch_size=4,
                                                       warmup_steps=2, max_steps=8, eval_interval=1000, eval_iters=2,
                                                       seed=7, sample_instruction="Hi"), **arguments})
        import json

        history = json.loads((out / "history.json").read_text())["history"]
        return next(h["val_loss"] for h in history if "val_loss" in h) - metrics["val_loss"]

    full_precision, four_bit = loss_drop(tmp_path / "dora"), loss_drop(tmp_path / "qdora", quantize="nf4-dq")
    assert full_precision > 0.5
    assert four_bit > 0.8 * full_precision, (full_precision, four_bit)


def test_dora_details_magnitudes_stay_float32_unmerge_and_quantized_merge_round_trip():
    from lit_lora.lora import LoRALinear
    from lit_lora.speed.quantize import merge_lora_quantized, quantize_model

    ours, _, _ = twins(2, ("q", "v"), "dora")
    ours.to(torch.bfloat16)  # as Fabric's bf16-true does: DoRA's magnitudes stay float32, where updates register
    layer = next(iter(lora_layers(ours).values()))
    assert layer.lora_A.dtype == torch.bfloat16 and layer.lora_magnitude.dtype == torch.float32
    with torch.no_grad():
        before = layer.lora_magnitude.clone()
        layer.lora_magnitude.add_(3e-4)
    assert (layer.lora_magnitude - before).abs().min() > 2e-4

    ours, _, _ = twins(2, ("q", "v"), "dora")
    layer_weight = lora_layers(ours)["layers.0.attn.q_proj"].base.weight.detach().clone()
    merge_lora(ours)
    for layer in lora_layers(ours).values():
        layer.unmerge()
    torch.testing.assert_close(lora_layers(ours)["layers.0.attn.q_proj"].base.weight, layer_weight, atol=1e-6, rtol=0)

    ours, _, _ = twins(2, ("q", "v"), "dora")
    quantize_model(ours, "nf4-dq")  # the bases under LoRA become 4-bit
    idx = torch.randint(0, 256, (1, 9))
    with torch.no_grad():
        unmerged = ours.eval()(idx)
        merge_lora_quantized(ours)  # m * V / ||V|| from the dequantized base, in 16/32 bits
        torch.testing.assert_close(ours(idx), unmerged, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="only bias-free layers"):
        LoRALinear(torch.nn.Linear(4, 4, bias=True), 2, 4.0, use_dora=True)


def test_rank_patterns_must_match_an_adapted_module():
    model = Llama(Config.from_name("tiny", vocab_size=64))
    with pytest.raises(ValueError, match=r"patterns \['q_proj'\] match no adapted module"):
        add_lora(model, LoRAConfig(targets=("q", "v"), rank_pattern={"q_proj": 16}))  # PEFT's spelling
    add_lora(model, LoRAConfig(targets=("q", "v"), rank_pattern={"layers.*.attn.q_proj": 16}))
    assert lora_layers(model)["layers.0.attn.q_proj"].r == 16 and lora_layers(model)["layers.0.attn.v_proj"].r == 8


def test_lora_plus_learning_rates_reach_the_optimizer_through_train_step(tmp_path):
    from lit_lora.data import BatchSampler
    from lit_lora.train import Loop, TrainArgs, parameter_groups, setup_fabric, train_step

    model = Llama(Config.from_name("tiny", vocab_size=64))
    config = LoRAConfig(r=2, alpha=4, targets=("q", "v"), use_dora=True, lr_ratio=16.0)
    add_lora(model, config)
    mark_only_lora_as_trainable(model)
    fabric = setup_fabric(tmp_path, "32-true", accelerator="cpu")
    wrapped = fabric.setup_module(model)
    optimizer = fabric.setup_optimizers(torch.optim.AdamW(parameter_groups(wrapped, lambda n: lora_lr_scale(config, n))))
    rows = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 64, (2, 8))]
    loop = Loop(fabric, wrapped, optimizer, BatchSampler([8, 8], 2, shuffle=False, seed=0),
                TrainArgs(micro_batch_size=2, global_batch_size=2), tmp_path, {}, {"step": 0, "history": []})
    train_step(loop, rows, [[0, 1]], 1e-3)
    lrs = {len(group["params"]): group["lr"] for group in optimizer.param_groups}
    assert sorted(lrs.values()) == [1e-3, 16e-3]  # A at lr; B and the magnitudes at 16 x lr
    assert lrs[2 * 2] == 1e-3  # the 4 A matrices (2 layers x q, v)
