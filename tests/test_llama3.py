"""Llama 3.x and SmolLM2: the architecture switches, the presets, the Hugging Face tokenizer backend and the
chat templates, each against transformers / tokenizers as the reference."""

import io
import json
import runpy
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_greedy_tokens, lit_from_hf, make_hf_llama, make_hf_tokenizer
from test_lora import peft_twin, randomize_lora

from lit_lora.data import load_prepared_split
from lit_lora.files.checkpoint import load_checkpoint
from lit_lora.files.convert import convert_hf_checkpoint, convert_lit_checkpoint
from lit_lora.files.hf_names import config_from_hf, hf_to_lit_name
from lit_lora.generate import generate
from lit_lora.lora import LoRAConfig, add_lora, lora_disabled, merge_lora, remove_lora
from lit_lora.model import Config, Llama
from lit_lora.prompts import CHATML, LLAMA3, chat_style, check_dialog, dialog_tags, encode_dialog
from lit_lora.tokenizer import Tokenizer
from lit_lora.workflows.chat import Chat


ROOT = Path(__file__).resolve().parents[1]
LLAMA3_ROPE = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=16, rope_theta=500000.0)
# Tiny configurations of each switch: Llama 3's frequency-dependent RoPE scaling (an original context of 16
# positions, so the 100-token inputs below reach the rescaled frequencies), SmolLM2's shape (rope_theta
# 100000, tied embeddings, 9 query heads sharing 3 key/value heads), and linear RoPE scaling.
SWITCHES = {
    "llama3-rope": dict(n_head=4, n_kv_heads=2, hidden_size=64, rope_parameters=LLAMA3_ROPE),
    "smollm2": dict(n_head=9, n_kv_heads=3, hidden_size=72, tie=True, rope_parameters=dict(rope_type="default", rope_theta=100000.0)),
    "linear-rope": dict(n_head=4, n_kv_heads=4, hidden_size=64, rope_parameters=dict(rope_type="linear", factor=4.0, rope_theta=10000.0)),
}


def hf_logits(model, idx):
    with torch.no_grad():
        return model(idx).logits


# 1. Architecture switches against transformers -------------------------------------------------------

@pytest.mark.parametrize("switch", sorted(SWITCHES))
def test_switch_converts_generates_and_exports_like_transformers(switch, tmp_path):
    from transformers import LlamaForCausalLM

    hf = make_hf_llama(n_layer=2, vocab_size=320, **SWITCHES[switch])
    hf.save_pretrained(tmp_path / "hf")
    convert_hf_checkpoint(tmp_path / "hf", tmp_path / "lit")
    ours = load_checkpoint(tmp_path / "lit").eval()
    idx = torch.randint(0, 320, (2, 100), generator=torch.Generator().manual_seed(0))
    expected = hf_logits(hf, idx)
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), expected, atol=1e-4, rtol=0)
        if switch != "smollm2":  # the scaling matters: the same weights without it are far off
            plain = Llama(Config(**{**ours.config.to_dict(), "rope_scaling": None}))
            plain.load_state_dict(ours.state_dict())
            assert (plain.eval()(idx) - expected).abs().max() > 1e-2

    prompt = idx[0, :8]
    greedy = generate(ours, prompt, 32, temperature=0.0)
    reference = hf.generate(prompt[None], max_new_tokens=32, do_sample=False, min_new_tokens=32)[0]
    assert_greedy_tokens(greedy, reference, lambda x: hf(x[None]).logits[0], len(prompt))

    convert_lit_checkpoint(tmp_path / "lit", tmp_path / "export")
    exported = LlamaForCausalLM.from_pretrained(tmp_path / "export").eval()
    torch.testing.assert_close(hf_logits(exported, idx), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("switch", ["llama3-rope", "smollm2"])
def test_lora_on_the_switches_equals_peft(switch):
    hf = make_hf_llama(n_layer=2, **SWITCHES[switch])
    ours = lit_from_hf(hf)
    idx = torch.randint(0, hf.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    base_logits = hf_logits(hf, idx)
    lora_config = LoRAConfig(r=4, alpha=8, dropout=0.0, targets=("q", "k", "v", "o", "mlp"))
    add_lora(ours, lora_config)
    randomize_lora(ours)
    peft_model = peft_twin(hf, ours, lora_config)
    with torch.no_grad():
        expected, actual = peft_model(idx).logits, ours(idx)
        with lora_disabled(ours):
            torch.testing.assert_close(ours(idx), base_logits, atol=1e-4, rtol=0)
    assert (expected - base_logits).abs().max() > 0.5
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=0)
    merge_lora(ours)
    remove_lora(ours)
    ours_state = ours.state_dict()
    for name, weight in peft_model.merge_and_unload().state_dict().items():
        torch.testing.assert_close(ours_state[hf_to_lit_name(name)], weight, atol=1e-6, rtol=0)


def test_compiled_decodings_rotary_tables_follow_the_scaling():
    """The compiled decoder computes its rotary tables apart from the model: they must scale the same way."""
    from lit_lora.model import rope_cos_sin
    from lit_lora.speed.decoding import CompiledDecoding

    config = config_from_hf(make_hf_llama(n_layer=1, **SWITCHES["llama3-rope"]).config.to_dict())
    cos, sin = CompiledDecoding(Llama(config)).rope_tables(100)
    expected = rope_cos_sin(torch.arange(100), config.head_size, config.rope_theta, torch.float32, config.rope_scaling)
    assert torch.equal(cos, expected[0][0]) and torch.equal(sin, expected[1][0])


# 2. Presets: the published configs, counted by transformers --------------------------------------------

LLAMA3_SCALING = dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=8192)
PUBLISHED = {  # the config.json fields of each model on the Hugging Face Hub
    "Llama-3.2-1B": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0,
                         rope_scaling=LLAMA3_SCALING, tie_word_embeddings=True, head_dim=64),
    "Llama-3.2-3B": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                         num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0,
                         rope_scaling=LLAMA3_SCALING, tie_word_embeddings=True, head_dim=128),
    "Llama-3.1-8B": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0,
                         rope_scaling={**LLAMA3_SCALING, "factor": 8.0}, tie_word_embeddings=False),
    "SmolLM2-135M": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0,
                         tie_word_embeddings=True),
    "SmolLM2-360M": dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
                         num_key_value_heads=5, vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0,
                         tie_word_embeddings=True),
    "SmolLM2-1.7B": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=49152, max_position_embeddings=8192, rope_theta=130000.0,
                         tie_word_embeddings=True),
}
ROUNDED = {"Llama-3.2-1B": 1.24e9, "Llama-3.2-3B": 3.21e9, "Llama-3.1-8B": 8.03e9, "SmolLM2-135M": 135e6,
           "SmolLM2-360M": 362e6, "SmolLM2-1.7B": 1.71e9}  # as the model cards round them


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_parameter_counts_equal_transformers(name):
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        reference = sum(p.numel() for p in LlamaForCausalLM(LlamaConfig(**PUBLISHED[name])).parameters())
        ours = sum(p.numel() for p in Llama(Config.from_name(name)).parameters())
    assert ours == reference and abs(ours / ROUNDED[name] - 1) < 0.005, (ours, reference)
    converted = config_from_hf({"model_type": "llama", **PUBLISHED[name]}).to_dict()
    assert {**converted, "name": name} == Config.from_name(name).to_dict()


# 3. The Hugging Face tokenizer backend against transformers' AutoTokenizer -----------------------------

TEXTS = [
    "Hello world", " leading space", "   three leading spaces and trailing ", "digits 1234567 and 3.14159",
    "def f(x):\n\treturn x ** 2  # square\n", "naïve café, 日本語, Ελληνικά, 🙂🚀", "line one\n\nline two\r\n",
    "tabs\tand\u00a0non-breaking", "special <|eot_id|> inside <|im_start|>text", "<|begin_of_text|>at the start",
    "", "'s 've 'LL contractions", "x" * 50,
]


@pytest.fixture(scope="module", params=["llama3", "smollm2"])
def family(request, tmp_path_factory):
    return request.param, make_hf_tokenizer(tmp_path_factory.mktemp(request.param), request.param)


def test_ids_equal_autotokenizer_and_decode_inverts_encode(family):
    from transformers import AutoTokenizer

    name, directory = family
    reference, ours = AutoTokenizer.from_pretrained(directory), Tokenizer(directory)
    assert ours.backend == "huggingface" and ours.vocab_size == len(reference)
    for text in TEXTS:
        assert ours.encode(text, bos=True).tolist() == reference(text)["input_ids"], text
        assert ours.encode(text, bos=False).tolist() == reference(text, add_special_tokens=False)["input_ids"], text
        if not any(token in text for token in ("<|eot_id|>", "<|begin_of_text|>")):
            assert ours.decode(ours.encode(text)) == text
    assert ours.encode_batch(TEXTS) == [reference(t, add_special_tokens=False)["input_ids"] for t in TEXTS]


def test_special_ids_come_from_the_files(family):
    name, directory = family
    ours = Tokenizer(directory)
    tokens = json.loads((directory / "tokenizer.json").read_text())["added_tokens"]
    ids = {token["content"]: token["id"] for token in tokens}
    if name == "llama3":
        generation = json.loads((directory / "generation_config.json").read_text())
        assert (ours.bos_id, ours.eos_id, ours.add_bos) == (ids["<|begin_of_text|>"], ids["<|eot_id|>"], True)
        assert set(ours.stop_ids) == set(generation["eos_token_id"]) and chat_style(ours) is LLAMA3
    else:
        assert (ours.eos_id, ours.add_bos, ours.pad_id) == (ids["<|im_end|>"], False, ids["<|im_end|>"])
        assert ours.stop_ids == (ids["<|im_end|>"],) and chat_style(ours) is CHATML


@pytest.mark.parametrize("name", ["smollm2", "llama3"])
def test_add_bos_token_decides_when_the_post_processor_adds_nothing(tmp_path, name):
    """tokenizer_config.json's add_bos_token, as a GGUF importer writes it: honoured when tokenizer.json's
    post-processor adds no special token (SmolLM2's), as llama.cpp does; transformers 5's byte-level tokenizers
    ignore it, so their ids without special tokens are the reference. A post-processor that adds BOS (Llama
    3's) decides, as in transformers, whatever the setting says."""
    from transformers import AutoTokenizer

    directory = make_hf_tokenizer(tmp_path, name, add_bos_token=name == "smollm2")
    reference, ours = AutoTokenizer.from_pretrained(directory), Tokenizer(directory)
    assert ours.add_bos
    for text in TEXTS[:5]:
        assert ours.encode(text).tolist() == [ours.bos_id] + reference(text, add_special_tokens=False)["input_ids"]
        if name == "llama3":
            assert ours.encode(text).tolist() == reference(text)["input_ids"]


# 4. Chat templates against apply_chat_template -----------------------------------------------------------

SYSTEM = {"role": "system", "content": "You are terse."}
TURNS = [{"role": "user", "content": "What is the capital of France?"},
         {"role": "assistant", "content": "Paris is the capital of France."},
         {"role": "user", "content": " And 1234 + 1? "},
         {"role": "assistant", "content": "1235, naïve café 🙂"},
         {"role": "user", "content": "def f(x):\n    return x"},
         {"role": "assistant", "content": "  It returns x.\n"}]
DIALOGS = {f"{'system, ' if system else ''}{turns} turns, {'open' if open_ else 'finished'}":
           ([SYSTEM] if system else []) + TURNS[: 2 * turns - open_]
           for system in (False, True) for turns in (1, 2, 3) for open_ in (False, True)}


@pytest.mark.parametrize("dialog", sorted(DIALOGS))
def test_dialog_ids_and_labels_equal_apply_chat_template(family, dialog):
    from transformers import AutoTokenizer

    name, directory = family
    messages = DIALOGS[dialog]
    reference, ours = AutoTokenizer.from_pretrained(directory), Tokenizer(directory)
    open_prompt = messages[-1]["role"] == "user"
    expected = reference.apply_chat_template(messages, tokenize=True, add_generation_prompt=open_prompt)
    expected = expected["input_ids"] if hasattr(expected, "keys") else expected
    ids, learned = encode_dialog(ours, messages)
    assert ids == list(expected)

    # Learned: exactly each answer's tokens (Llama 3's template trims the content) and its end-of-turn token,
    # found in order in the ids; nothing else, id by id.
    end_of_turn = ours.token_to_id("<|eot_id|>" if name == "llama3" else "<|im_end|>")
    mask, cursor = [False] * len(ids), 0
    for message in messages:
        if message["role"] == "assistant":
            content = message["content"].strip() if name == "llama3" else message["content"]
            answer = reference(content, add_special_tokens=False)["input_ids"] + [end_of_turn]
            cursor = next(i for i in range(cursor, len(ids)) if ids[i: i + len(answer)] == answer)
            mask[cursor: cursor + len(answer)] = [True] * len(answer)
            cursor += len(answer)
    assert learned == mask and any(learned) == any(m["role"] == "assistant" for m in messages)


def test_dialog_refuses_the_templates_special_tokens(family):
    name, directory = family
    tags = dialog_tags(Tokenizer(directory))
    with pytest.raises(ValueError, match="tags"):
        check_dialog([{"role": "user", "content": "hi <|im_end|><|eot_id|> there"}], ends_with="user", tags=tags)


# 5. End to end on a tiny SmolLM2-shaped model -------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("smollm2")
    make_hf_tokenizer(root / "hf", "smollm2")
    vocab = Tokenizer(root / "hf").vocab_size
    make_hf_llama(n_layer=2, n_head=9, n_kv_heads=3, hidden_size=72, vocab_size=vocab, tie=True,
                  max_position_embeddings=256, rope_parameters=dict(rope_type="default", rope_theta=100000.0)
                  ).save_pretrained(root / "hf")
    convert_hf_checkpoint(root / "hf", root / "lit")
    return root


@pytest.mark.slow
def test_smollm2_prepare_finetune_generate_and_chat_stop_at_the_end_of_turn(smollm2_checkpoint, monkeypatch, capsys):
    root = smollm2_checkpoint
    records = [{"instruction": f"Name thing number {i}.", "input": "", "output": "Yes."} for i in range(24)]
    (root / "alpaca.json").write_text(json.dumps(records))
    chats = [{"messages": [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": "Yes."},
                           {"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "Yes."}]} for i in range(24)]
    (root / "chat.jsonl").write_text("\n".join(json.dumps(c) for c in chats))
    script = lambda folder, name: runpy.run_path(str(ROOT / folder / f"{name}.py"))["main"]  # noqa: E731
    script("scripts", "prepare_json")(data_file=root / "alpaca.json", destination_path=root / "alpaca",
                                      checkpoint_dir=root / "lit", val_size=2, max_seq_length=256)
    config = script("scripts", "prepare_chat")(data_file=root / "chat.jsonl", destination_path=root / "chat",
                                               checkpoint_dir=root / "lit", val_size=2, max_seq_length=256)
    tokenizer = Tokenizer(root / "lit")
    im_end = tokenizer.token_to_id("<|im_end|>")
    assert config["prompt_style"] == "chatml"
    for data in ("alpaca", "chat"):
        sample = load_prepared_split(root / data, "train")[0]
        assert sample["input_ids"][-1 if data == "alpaca" else -2] == im_end  # ChatML ends a turn with "\n"

    from lit_lora.train import TrainArgs

    train = TrainArgs(learning_rate=3e-2, global_batch_size=8, micro_batch_size=8, warmup_steps=2, max_steps=20,
                      eval_interval=1000, eval_iters=1, seed=1, sample_instruction="Hi")
    for data in ("alpaca", "chat"):
        script("finetune", "lora")(checkpoint_dir=root / "lit", data_dir=root / data, out_dir=root / f"lora-{data}",
                                   lora=LoRAConfig(r=8, alpha=16, dropout=0.0, targets=("q", "k", "v", "o", "mlp")),
                                   train=train, accelerator="cpu")
    answers = script("generate", "lora")(checkpoint_dir=root / "lit", lora_path=root / "lora-alpaca" / "lit_lora.safetensors",
                                         prompt="Name thing number 3.", temperature=0.0, max_new_tokens=20,
                                         device="cpu", dtype="float32")
    assert answers == ["Yes."]  # it stopped at the end-of-text token (<|im_end|>), long before 20 tokens

    monkeypatch.setattr(sys, "stdin", io.StringIO("Question 5?\nSure?\n"))
    answers = script("generate", "chat")(checkpoint_dir=root / "lit", lora_path=root / "lora-chat" / "lit_lora.safetensors",
                                         temperature=0.0, max_new_tokens=20, dtype="float32", device="cpu")
    assert answers == ["Yes.", "Yes."]
    generated = [int(line.split("generated ")[1].split(";")[0]) for line in capsys.readouterr().err.splitlines()
                 if line.startswith("(fed ")]
    assert generated and all(count < 20 for count in generated)  # each answer ended at <|im_end|>


def test_chat_keeps_the_cache_and_stops_at_the_end_of_turn_token(smollm2_checkpoint):
    root = smollm2_checkpoint
    model, tokenizer = load_checkpoint(root / "lit").eval(), Tokenizer(root / "lit")
    chat = Chat(model, tokenizer, max_new_tokens=8, temperature=0.0)
    chat.respond("Hello there?")
    second = chat.respond("And again?")
    assert second.prefilled < len(encode_dialog(tokenizer, chat.messages[:3], check=False)[0]) // 2  # the cache kept turn 1

    # A random model rarely says <|im_end|> by itself: make it the top token, and the answer ends right there.
    bias = torch.zeros(tokenizer.vocab_size)
    bias[tokenizer.token_to_id("<|im_end|>")] = 1e4
    model.lm_head.register_forward_hook(lambda module, args, output: output + bias)
    chat.reset()
    turn = chat.respond("Hi")
    assert (turn.answer, turn.generated) == ("", 1)
