"""The Llama 2 chat format token by token against Meta's rules (written here from
../shared/reference/llama2-chat-format.md), conversation data, a chat finetune, and generate/chat.py."""

import io
import json
import runpy
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_greedy_tokens
from sentencepiece import SentencePieceProcessor

from lit_lora.data import IGNORE_INDEX, load_prepared_split
from lit_lora.files.checkpoint import load_checkpoint
from lit_lora.generate import generate
from lit_lora.prompts import LLAMA2_CHAT, encode_dialog
from lit_lora.tokenizer import Tokenizer
from lit_lora.workflows.conversations import prepare_conversation_data


ROOT = Path(__file__).resolve().parents[1]


def meta_dialog_ids(sp: SentencePieceProcessor, dialog):
    """Meta's reference rules, independently: (ids, learned) for a dialog ending with a user message
    (a prompt) or an assistant message (a training sample)."""
    if dialog[0]["role"] == "system":
        dialog = [{"role": "user", "content": "<<SYS>>\n" + dialog[0]["content"] + "\n<</SYS>>\n\n" + dialog[1]["content"]},
                  *dialog[2:]]
    ids, learned = [], []
    pairs = [(dialog[i]["content"], dialog[i + 1]["content"]) for i in range(0, len(dialog) - 1, 2)]
    for user, answer in pairs:
        pair = [sp.bos_id()] + sp.encode(f"[INST] {user.strip()} [/INST] {answer.strip()} ") + [sp.eos_id()]
        question = [sp.bos_id()] + sp.encode(f"[INST] {user.strip()} [/INST]")
        ids += pair
        learned += [False] * len(question) + [True] * (len(pair) - len(question))
    if dialog[-1]["role"] == "user":
        final = [sp.bos_id()] + sp.encode(f"[INST] {dialog[-1]['content'].strip()} [/INST]")
        ids += final
        learned += [False] * len(final)
    return ids, learned


DIALOGS = {
    "single turn": [{"role": "user", "content": "What is the capital of France?"}],
    "system, single turn": [{"role": "system", "content": "Answer in one word. "},
                            {"role": "user", "content": "  What is the capital of France? "}],
    "multi turn": [{"role": "user", "content": "Hi there!"}, {"role": "assistant", "content": " Hello! How can I help? "},
                   {"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
                   {"role": "user", "content": "Another one, with émoji 🎨?"}],
    "system, multi turn": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"},
                           {"role": "assistant", "content": "4"}, {"role": "user", "content": "3+3?"}],
    "training sample": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hello"},
                        {"role": "assistant", "content": "Hi!"}, {"role": "user", "content": "Bye"},
                        {"role": "assistant", "content": "Goodbye, take care."}],
}


@pytest.mark.parametrize("name", list(DIALOGS))
def test_dialog_ids_equal_metas_rules(llama2_tokenizer_path, name):
    tokenizer = Tokenizer(llama2_tokenizer_path)
    sp = SentencePieceProcessor(model_file=str(llama2_tokenizer_path))
    assert encode_dialog(tokenizer, DIALOGS[name]) == meta_dialog_ids(sp, DIALOGS[name])


def test_single_turn_prompt_style_equals_the_dialog_prompt(llama2_tokenizer_path):
    """generate/lora.py with an adapter trained in llama2-chat style prompts exactly as a one-turn chat."""
    tokenizer = Tokenizer(llama2_tokenizer_path)
    prompt = tokenizer.encode(LLAMA2_CHAT.format("Name a colour."), bos=True).tolist()
    assert prompt == encode_dialog(tokenizer, [{"role": "user", "content": "Name a colour."}])[0]


@pytest.mark.parametrize("name", list(DIALOGS))
def test_transformers_chat_template_gives_the_same_ids(llama2_tokenizer_path, tmp_path, name):
    """Hugging Face's route: the Llama-2-chat Jinja template writes "<s>"/"</s>" as text and its tokenizer
    encodes the whole dialog as one string. On these dialogs (system message, several turns, stray spaces,
    emoji) it gives exactly Meta's per-pair ids; where the two ever part, Meta's is the reference."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("google.protobuf", reason="transformers reads tokenizer.model through protobuf")
    (tmp_path / "tokenizer.model").write_bytes(llama2_tokenizer_path.read_bytes())
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    hf.chat_template = (  # the template of meta-llama/Llama-2-*-chat-hf (its tokenizer_config.json)
        "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
        "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
        "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
        "{% if loop.index0 == 0 and system_message != false %}"
        "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
        "{% else %}{% set content = message['content'] %}{% endif %}"
        "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")
    assert template_ids(hf, DIALOGS[name]) == encode_dialog(Tokenizer(llama2_tokenizer_path), DIALOGS[name])[0]


def template_ids(hf_tokenizer, dialog):
    ids = hf_tokenizer.apply_chat_template(dialog, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def conversation_records(shared_data, turns=3, count=24):
    """Three-turn conversations made of consecutive Alpaca records, in both record shapes."""
    alpaca = json.loads((shared_data / "alpaca" / "alpaca_data_sample.json").read_text())
    openai, sharegpt = [], []
    for start in range(0, turns * count, turns):
        messages = [{"role": "system", "content": "You are a helpful assistant."}] if start % 2 else []
        for record in alpaca[start : start + turns]:
            messages += [{"role": "user", "content": record["instruction"]},
                         {"role": "assistant", "content": record["output"]}]
        openai.append({"messages": messages})
        names = {"system": "system", "user": "human", "assistant": "gpt"}
        sharegpt.append({"conversations": [{"from": names[m["role"]], "value": m["content"]} for m in messages]})
    return openai, sharegpt


def test_labels_cover_every_answer_and_its_eos_and_both_shapes_prepare_alike(shared_data, llama2_tokenizer_path, tmp_path):
    openai, sharegpt = conversation_records(shared_data)
    (tmp_path / "openai.jsonl").write_text("\n".join(json.dumps(r) for r in openai))
    (tmp_path / "sharegpt.json").write_text(json.dumps(sharegpt))
    first = prepare_conversation_data(tmp_path / "openai.jsonl", tmp_path / "a", llama2_tokenizer_path,
                                      max_seq_length=4096, val_size=4)
    prepare_conversation_data(tmp_path / "sharegpt.json", tmp_path / "b", llama2_tokenizer_path, max_seq_length=4096,
                              val_size=4)
    for name in ("train.safetensors", "val.safetensors"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert first["prompt_style"] == "llama2-chat" and first["counts"]["kept"] == 24

    sp = SentencePieceProcessor(model_file=str(llama2_tokenizer_path))
    samples = load_prepared_split(tmp_path / "a", "train") + load_prepared_split(tmp_path / "a", "val")
    expected = {tuple(meta_dialog_ids(sp, r["messages"])[0]): meta_dialog_ids(sp, r["messages"])[1] for r in openai}
    for sample in samples:
        ids = sample["input_ids"].tolist()
        learned = expected[tuple(ids)]  # every sample is one of the conversations, laid out by Meta's rules
        for token, label, learn in zip(ids, sample["labels"].tolist(), learned):  # id by id
            assert label == (token if learn else IGNORE_INDEX)
        assert sum(learned) > 0 and ids.count(sp.eos_id()) == 3 and sum(t == sp.eos_id() and l != IGNORE_INDEX
                                                                        for t, l in zip(ids, sample["labels"].tolist())) == 3


def test_long_conversations_keep_whole_exchanges_and_bad_ones_are_counted(shared_data, llama2_tokenizer_path, tmp_path):
    openai, _ = conversation_records(shared_data, count=6)
    bad = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "beep"}]},  # unknown role
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]},  # empty content
        {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                      {"role": "assistant", "content": "c"}]},  # two user turns in a row
        {"messages": [{"role": "user", "content": "is anyone there?"}]},  # no answer
        {"messages": [{"role": "user", "content": "say [INST]"}, {"role": "assistant", "content": "no"}]},  # a tag
        {"text": "not a conversation"},
    ]
    (tmp_path / "data.json").write_text(json.dumps(openai + bad))
    config = prepare_conversation_data(tmp_path / "data.json", tmp_path / "out", llama2_tokenizer_path,
                                       max_seq_length=160, val_size=1)
    counts = config["counts"]
    assert counts["dropped_malformed"] == 6 and len(config["skipped"]) == 6
    assert "unknown role 'robot'" in config["skipped"][0] and "no content" in config["skipped"][1]
    assert "alternating" in config["skipped"][2] and "must end with an assistant" in config["skipped"][3]
    assert "tags" in config["skipped"][4] and "'messages' list" in config["skipped"][5]
    assert counts["kept"] + counts["dropped_too_long"] == 6 and counts["truncated"] > 0
    for sample in load_prepared_split(tmp_path / "out", "train"):
        ids = sample["input_ids"].tolist()
        assert len(ids) <= 160 and ids[-1] == 2  # whole exchanges only: it ends with an answer's EOS
    with pytest.raises(ValueError, match=r"data.json: record 7: message 2: unknown role 'robot'"):
        prepare_conversation_data(tmp_path / "data.json", tmp_path / "strict", llama2_tokenizer_path,
                                  max_seq_length=160, val_size=1, strict=True)


@pytest.fixture(scope="module")
def chat_run(tiny_run, tmp_path_factory, shared_data, llama2_tokenizer_path):
    """A LoRA finetuned on three-turn conversations (tiny model, real tokenizer)."""
    from lit_lora.lora import LoRAConfig
    from lit_lora.methods import finetune
    from lit_lora.train import TrainArgs

    root = tmp_path_factory.mktemp("chat")
    openai, _ = conversation_records(shared_data, count=30)
    (root / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in openai))
    prepare_conversation_data(root / "chat.jsonl", root / "data", llama2_tokenizer_path, max_seq_length=256, val_size=4)
    metrics = finetune("lora", {"checkpoint_dir": tiny_run / "base", "data_dir": root / "data", "out_dir": root / "lora",
                                "accelerator": "cpu", "lora": LoRAConfig(r=8, alpha=16, dropout=0.0),
                                "train": TrainArgs(learning_rate=2e-2, global_batch_size=8, micro_batch_size=4,
                                                   warmup_steps=2, max_steps=12, eval_interval=1000, eval_iters=1,
                                                   seed=3, sample_instruction="Hi")})
    return root, metrics


def test_a_chat_lora_learns_from_multi_turn_data(chat_run):
    root, metrics = chat_run
    history = json.loads((root / "lora" / "history.json").read_text())["history"]
    initial = next(h["val_loss"] for h in history if "val_loss" in h)
    assert metrics["val_loss"] < initial - 1.0, (initial, metrics["val_loss"])
    from lit_lora.methods import read_weights

    assert read_weights(root / "lora" / "lit_lora.safetensors").prompt_style == "llama2-chat"


def test_chat_script_answers_turns_feeding_only_their_new_tokens(tiny_run, chat_run, monkeypatch, capsys):
    root, _ = chat_run
    turns = ["Give three tips for staying healthy.", "What are the three primary colors?", "Thanks!"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join([turns[0], "", turns[1], turns[2]]) + "\n/quit\nignored\n"))
    main = runpy.run_path(str(ROOT / "generate" / "chat.py"))["main"]
    answers = main(checkpoint_dir=tiny_run / "base", lora_path=root / "lora" / "lit_lora.safetensors",
                   system="Be brief.", temperature=0.0, max_new_tokens=12, dtype="float32", device="cpu")
    captured = capsys.readouterr()
    assert len(answers) == 3 and captured.out.count("\n") == 3
    fed = [int(line.split("fed ")[1].split(" ")[0]) for line in captured.err.splitlines() if line.startswith("(fed ")]

    # From scratch, greedy, over the whole formatted history: the same answers, and each turn fed only
    # what the cache did not hold.
    from lit_lora.methods import apply_weights

    model = load_checkpoint(tiny_run / "base").eval()
    apply_weights(model, root / "lora" / "lit_lora.safetensors")
    tokenizer = Tokenizer(tiny_run / "base" / "tokenizer.model")
    messages = [{"role": "system", "content": "Be brief."}]
    previous = []
    for number, (text, answer) in enumerate(zip(turns, answers)):
        ids = encode_dialog(tokenizer, [*messages, {"role": "user", "content": text}], check=False)[0]
        scratch = generate(model, torch.tensor(ids), 12, temperature=0.0, eos_id=tokenizer.eos_id)
        ours = torch.tensor(ids + tokenizer.encode(answer, bos=False).tolist())
        new = scratch[len(ids):]
        expected_text = tokenizer.decode([t for t in new.tolist() if t != tokenizer.eos_id])
        if expected_text != answer:  # two computation paths (cached vs from scratch): a near-tie may part them
            assert_greedy_tokens(ours, scratch[: len(ours)], lambda x: model(x[None])[0], len(ids))
        common = next((i for i, (a, b) in enumerate(zip(previous, ids)) if a != b), min(len(previous), len(ids)))
        assert fed[number] == len(ids) - common and (number == 0 or fed[number] < len(ids) // 2)
        previous = (scratch[:-1]).tolist()
        messages += [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]


def test_chat_refuses_format_tags_and_warns_before_the_context_is_full(tiny_run, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("say [INST] please\nHello\n/reset\nHello again\n"))
    main = runpy.run_path(str(ROOT / "generate" / "chat.py"))["main"]
    answers = main(checkpoint_dir=tiny_run / "base", temperature=0.0, max_new_tokens=200, dtype="float32", device="cpu")
    err = capsys.readouterr().err
    assert len(answers) == 2 and "contains one of the format's tags" in err
    assert "the conversation starts afresh" in err and "context is nearly full" in err


def test_generate_refuses_a_cache_that_does_not_fit_and_chat_refuses_a_full_context(tiny_run):
    from lit_lora.workflows.chat import Chat

    model = load_checkpoint(tiny_run / "base").eval()
    prompt = torch.randint(0, 32000, (10,))
    with pytest.raises(ValueError, match="continues the KV cache the caller set"):
        generate(model, prompt, 5, temperature=0.0, cached=4)  # no cache set
    model.set_kv_cache(batch_size=1, max_seq_length=12)
    with pytest.raises(ValueError, match="hold 1 rows and 15 positions"):
        generate(model, prompt, 5, temperature=0.0, cached=4)  # the cache is too short
    model.clear_kv_cache()
    chat = Chat(model, Tokenizer(tiny_run / "base" / "tokenizer.model"), max_new_tokens=4)
    with pytest.raises(ValueError, match=r"this message alone takes \d+ of the model's 256 context positions"):
        chat.respond("word " * 300)
    assert chat.respond("Hello").generated <= 4  # the conversation goes on after a refused turn
    with pytest.raises(ValueError, match=r"would take \d+ of the model's 256 context positions: start afresh"):
        chat.respond("word " * 120) and chat.respond("word " * 120)  # fits alone, not after the turn before
