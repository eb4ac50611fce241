"""The method registry: a new method is one `Method` entry plus its own code, and then finetuning,
saving, loading, generation and `compare` all work with it, without touching any other file."""

import json

import pytest
import torch
import torch.nn as nn

from lit_lora.evaluation.compare import RunResult, Variant, compare_methods, load_finetuned, parse_variant
from lit_lora.files.checkpoint import CheckpointError, check_keys_and_shapes, load_checkpoint
from lit_lora.methods import METHODS, Method, apply_weights, read_weights, register_method, save_weights, take_off
from lit_lora.model import Llama


# ---- the toy method's own code: a trainable bias on the logits ------------------------------------------


class BiasedHead(nn.Module):
    """lm_head(x) + bias: the smallest method there is (one trainable vector of vocabulary size)."""

    def __init__(self, head: nn.Linear) -> None:
        super().__init__()
        self.head = head
        self.bias = nn.Parameter(torch.zeros(head.out_features, device=head.weight.device, dtype=head.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x) + self.bias


def add_bias(model: Llama, config) -> None:
    model.lm_head = BiasedHead(model.lm_head)


def remove_bias(model: Llama) -> None:
    model.lm_head = model.lm_head.head


def mark_bias_trainable(model: Llama) -> None:
    model.requires_grad_(False)
    model.lm_head.bias.requires_grad_(True)


def bias_state_dict(model: Llama):
    return {"lm_head.bias": model.lm_head.bias.detach()}


def load_bias(model: Llama, state, source: str) -> None:
    check_keys_and_shapes({"lm_head.bias": model.lm_head.bias.shape}, state, source)
    with torch.no_grad():
        model.lm_head.bias.copy_(state["lm_head.bias"])


TOY = Method(name="head-bias", summary="a trainable bias on the logits (a toy method for the tests)",
             recipe=dict(learning_rate=5e-2, global_batch_size=8, micro_batch_size=4, warmup_steps=1),
             weights_name="head_bias.safetensors", config_type=None, add=add_bias, remove=remove_bias,
             mark_trainable=mark_bias_trainable, state_dict=bias_state_dict, load_state_dict=load_bias,
             state_shapes=lambda config, model_config: {"lm_head.bias": torch.Size((model_config.vocab_size,))})


@pytest.fixture
def toy_method():
    register_method(TOY)
    try:
        yield TOY
    finally:
        METHODS.pop(TOY.name)


def test_a_registered_toy_method_runs_through_compare(toy_method, tiny_run, tmp_path, capsys):
    assert parse_variant("head-bias") == Variant("head-bias", "head-bias")
    budget = dict(max_steps=3, global_batch_size=8, micro_batch_size=4, warmup_steps=1, eval_interval=2,
                  eval_iters=1, seed=1, save_interval=100)
    report = compare_methods(tiny_run / "base", tiny_run / "data", tmp_path / "compare",
                             [Variant("toy", "head-bias"), parse_variant("lora-r2-qv")], budget, accelerator="cpu")
    rows = json.loads((tmp_path / "compare" / "comparison.json").read_text())["rows"]
    assert [row["method"] for row in rows] == ["toy", "lora-r2-qv"]
    assert rows[0]["trainable params"] == "32,000" and "| toy | 32,000 |" in report
    assert "learning rate 0.05" in capsys.readouterr().out  # the toy method's own recipe
    path = tmp_path / "compare" / "toy" / "head_bias.safetensors"
    weights = read_weights(path)
    assert weights.method is TOY and weights.training == {"prompt_style": "alpaca", "max_seq_length": 128}
    assert weights.tensors["lm_head.bias"].abs().max() > 0  # it trained
    assert (tmp_path / "compare" / "lora_update_heatmap_lora-r2-qv.png").is_file()  # LoRA measures its update
    assert not list((tmp_path / "compare").glob("head-bias_update_heatmap*"))  # the toy method does not
    with pytest.raises(FileExistsError, match="already holds a finished run"):  # nobody's runs are replaced ...
        compare_methods(tiny_run / "base", tiny_run / "data", tmp_path / "compare", [Variant("toy", "head-bias")],
                        budget, accelerator="cpu")
    compare_methods(tiny_run / "base", tiny_run / "data", tmp_path / "compare", [Variant("toy", "head-bias")],
                    budget, accelerator="cpu", overwrite=True)  # ... unless asked to

    # The trained toy model, as compare scored it, equals the base with the bias added by hand.
    model = load_finetuned(RunResult("toy", "head-bias", tmp_path / "compare" / "toy"), tiny_run / "base",
                           torch.device("cpu"))
    base = load_checkpoint(tiny_run / "base").eval()
    idx = torch.randint(0, 32000, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), base(idx) + weights.tensors["lm_head.bias"], atol=1e-5, rtol=0)
    take_off(model, TOY)
    assert isinstance(model.lm_head, nn.Linear)


def test_a_weights_file_of_an_unknown_method_is_a_clear_error(toy_method, tiny_run, tmp_path):
    model = load_checkpoint(tiny_run / "base")
    add_bias(model, None)
    path = save_weights(tmp_path / "bias.safetensors", model, TOY, None)  # no settings
    remove_bias(model)
    assert apply_weights(model, path).method is TOY and isinstance(model.lm_head, BiasedHead)
    METHODS.pop(TOY.name)
    try:
        with pytest.raises(CheckpointError, match="holds weights of method 'head-bias', which this lit-lora does not know"):
            read_weights(path)
    finally:
        register_method(TOY)


def test_a_method_that_adds_modules_must_say_how_to_save_and_remove_them():
    with pytest.raises(ValueError, match="needs remove, state_dict, load_state_dict and state_shapes"):
        register_method(Method(name="broken", summary="", recipe={}, weights_name="x", add=add_bias))
    assert "broken" not in METHODS
