"""Instruction data: the prompt template, preparation (Alpaca, Dolly, any JSON/JSONL), and batching.

The expected token ids are computed here with SentencePiece directly and the Stanford Alpaca template
typed out again, so a mistake in lit_lora/prompts.py or lit_lora/workflows/prepare.py cannot hide in both sides.
"Encode" below means: [BOS] + sp.encode(prompt) + sp.encode(response) + [EOS] (prompt and response
tokenized separately, ids concatenated: see lit_lora/prompts.py).
"""

import hashlib
import io
import json
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from sentencepiece import SentencePieceProcessor

from lit_lora.data import (IGNORE_INDEX, BatchSampler, check_same_tokenizer, collate, load_prepare_config, load_prepared,
                           save_prepared)
from lit_lora.files.checkpoint import save_tensors
from lit_lora.prompts import PROMPT_STYLES, PromptStyle, get_prompt_style, register_prompt_style
from lit_lora.workflows.prepare import (DOLLY_FIELDS, choose_val_positions, download_if_missing, fit_sample,
                                        prepare_instruction_data, read_examples)


ROOT = Path(__file__).resolve().parents[1]
NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
            "request.\n\n### Instruction:\n{instruction}\n\n### Response:")
WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further context. "
              "Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n"
              "### Input:\n{input}\n\n### Response:")


def subprocess_env(**extra: str) -> dict:
    env = {name: value for name, value in os.environ.items() if name != "LIT_LORA_DEBUG"}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def script_main(name: str):
    """The `main` function of scripts/<name>.py, called in-process (faster than a subprocess)."""
    return runpy.run_path(str(ROOT / "scripts" / f"{name}.py"))["main"]


@pytest.fixture(scope="module")
def sp(llama2_tokenizer_path) -> SentencePieceProcessor:
    return SentencePieceProcessor(model_file=str(llama2_tokenizer_path))


def expected_sample(sp, instruction: str, input: str, output: str):
    """(ids, prompt length incl. BOS) computed independently of lit_lora."""
    prompt = WITH_INPUT.format(instruction=instruction, input=input) if input else NO_INPUT.format(instruction=instruction)
    prompt_ids = sp.encode(prompt)
    return [sp.bos_id()] + prompt_ids + sp.encode(output) + [sp.eos_id()], 1 + len(prompt_ids), prompt


def split_samples(destination: Path):
    return load_prepared(destination / "train.safetensors"), load_prepared(destination / "val.safetensors")


def check_against_records(sp, records, train, val, val_positions, keys=("instruction", "input", "output")):
    """Every record's ids equal encode(...), its prompt labels are ignored exactly up to the response."""
    expected = {"train": [], "val": []}
    for position, record in enumerate(records):
        instruction, input, output = (record[key] for key in keys)
        ids, prompt_length, prompt = expected_sample(sp, instruction, input, output)
        expected["val" if position in val_positions else "train"].append((ids, prompt_length, prompt, output))
    for samples, split in ((train, "train"), (val, "val")):
        assert len(samples) == len(expected[split])
        for sample, (ids, prompt_length, prompt, output) in zip(samples, expected[split]):
            assert sample["input_ids"].dtype == sample["labels"].dtype == torch.long
            assert sample["input_ids"].tolist() == ids
            labels = sample["labels"].tolist()
            assert labels[:prompt_length] == [IGNORE_INDEX] * prompt_length
            assert labels[prompt_length:] == ids[prompt_length:] == sp.encode(output) + [sp.eos_id()]
            # the text the model reads: the prompt, SentencePiece's word-boundary space, the response
            assert sp.decode(ids) == prompt + " " + output


# ----------------------------------------------------------------------------------------------- prompts


def test_alpaca_templates_are_stanfords():
    style = get_prompt_style("alpaca")
    assert style.format("Do X.") == NO_INPUT.format(instruction="Do X.")
    assert style.format("Do X.", "with Y") == WITH_INPUT.format(instruction="Do X.", input="with Y")
    assert style.format("Do X.", " \n") == NO_INPUT.format(instruction="Do X.")  # blank input: no Input section
    assert style.format("Use {braces}", "{input}") == WITH_INPUT.format(instruction="Use {braces}", input="{input}")


def test_prompt_style_registry(monkeypatch, tmp_path, llama2_tokenizer_path, sp):
    monkeypatch.setattr("lit_lora.prompts.PROMPT_STYLES", dict(PROMPT_STYLES))
    with pytest.raises(ValueError, match="unknown prompt style 'mine'; known styles: alpaca"):
        get_prompt_style("mine")
    with pytest.raises(ValueError, match="needs an {instruction} field"):
        register_prompt_style(PromptStyle("bad", "Q:", "Q: {input}"))
    with pytest.raises(ValueError, match="template_with_input needs an {input} field"):
        register_prompt_style(PromptStyle("bad", "Q: {instruction}", "Q: {instruction}"))
    mine = register_prompt_style(PromptStyle("mine", "Q: {instruction}\nA:", "Q: {instruction}\nC: {input}\nA:"))
    assert get_prompt_style("mine") is mine

    data = tmp_path / "d.json"
    data.write_text(json.dumps([{"instruction": "Hi?", "output": "Hello."}, {"instruction": "x", "input": "y", "output": "z"}]))
    config = prepare_instruction_data(data, tmp_path / "out", llama2_tokenizer_path, prompt_style="mine", val_size=0)
    assert config["prompt_style"] == "mine"
    train, _ = split_samples(tmp_path / "out")
    assert train[0]["input_ids"].tolist() == [1] + sp.encode("Q: Hi?\nA:") + sp.encode("Hello.") + [2]
    assert train[1]["input_ids"].tolist() == [1] + sp.encode("Q: x\nC: y\nA:") + sp.encode("z") + [2]


# ------------------------------------------------------------------------------------- real Alpaca / Dolly


def test_alpaca_sample_ids_labels_and_reproducibility(shared_data, llama2_tokenizer_path, sp, tmp_path, capsys):
    data_file = shared_data / "alpaca" / "alpaca_data_sample.json"
    records = json.loads(data_file.read_text())
    assert len(records) == 102 and any(r["input"] for r in records) and any(not r["input"] for r in records)
    main = script_main("prepare_alpaca")
    config = main(data_file=data_file, tokenizer_path=llama2_tokenizer_path, destination_path=tmp_path / "a", val_size=10)

    val_positions = choose_val_positions(len(records), 0.0, 10, seed=42)
    train, val = split_samples(tmp_path / "a")
    check_against_records(sp, records, train, val, val_positions)
    assert config["counts"] == {"records_read": 102, "kept": 102, "truncated": 0, "dropped_malformed": 0,
                                "dropped_too_long": 0, "dropped_prompt_too_long": 0, "train": 92, "val": 10}
    lengths = [len(expected_sample(sp, r["instruction"], r["input"], r["output"])[0]) for r in records]
    assert config["token_lengths"] == {"p50": int(np.percentile(lengths, 50, method="higher")),
                                       "p90": int(np.percentile(lengths, 90, method="higher")),
                                       "p99": int(np.percentile(lengths, 99, method="higher")), "max": max(lengths)}
    summary = capsys.readouterr().out
    assert "read 102 records" in summary and f"p99 {config['token_lengths']['p99']}" in summary
    assert "kept 102 (train 92, val 10), of which 0 with a truncated response" in summary
    assert load_prepare_config(tmp_path / "a") == config
    tokenizer_bytes = llama2_tokenizer_path.read_bytes()
    assert config["tokenizer"]["sha256"] == hashlib.sha256(tokenizer_bytes).hexdigest()
    assert config["tokenizer"]["size"] == len(tokenizer_bytes)

    # the same inputs give byte-identical files: in another process (other hash seed), and over the old files
    subprocess.run([sys.executable, str(ROOT / "scripts" / "prepare_alpaca.py"), "--data_file", str(data_file),
                    "--tokenizer_path", str(llama2_tokenizer_path), "--destination_path", str(tmp_path / "b"),
                    "--val_size", "10"], check=True, capture_output=True, env=subprocess_env(PYTHONHASHSEED="123"))
    first = {name: (tmp_path / "a" / name).read_bytes() for name in ("train.safetensors", "val.safetensors", "prepare_config.json")}
    assert first == {name: (tmp_path / "b" / name).read_bytes() for name in first}
    main(data_file=data_file, tokenizer_path=llama2_tokenizer_path, destination_path=tmp_path / "a", val_size=10)
    assert first == {name: (tmp_path / "a" / name).read_bytes() for name in first}
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted(first)  # no temporary files left


def test_alpaca_without_prompt_masking_learns_every_token(shared_data, llama2_tokenizer_path, tmp_path):
    data_file = shared_data / "alpaca" / "alpaca_data_sample.json"
    prepare_instruction_data(data_file, tmp_path, llama2_tokenizer_path, mask_prompt=False)
    train, val = split_samples(tmp_path)
    assert len(train) + len(val) == 102
    assert all(torch.equal(s["input_ids"], s["labels"]) for s in train + val)


def test_dolly_sample_uses_context_as_input(shared_data, llama2_tokenizer_path, sp, tmp_path):
    data_file = shared_data / "dolly" / "databricks-dolly-sample.jsonl"
    records = [json.loads(line) for line in data_file.read_text().splitlines() if line.strip()]
    assert len(records) == 8 and any(r["context"] for r in records) and any(not r["context"] for r in records)
    config = script_main("prepare_dolly")(data_file=data_file, tokenizer_path=llama2_tokenizer_path,
                                          destination_path=tmp_path, val_size=2, seed=3)
    train, val = split_samples(tmp_path)
    check_against_records(sp, records, train, val, choose_val_positions(8, 0.0, 2, seed=3),
                          keys=("instruction", "context", "response"))
    assert config["counts"]["kept"] == 8 and (config["counts"]["train"], config["counts"]["val"]) == (6, 2)
    assert config["source"]["fields"] == {"instruction": "instruction", "input": "context", "output": "response"}


def test_prepare_json_with_own_field_names(llama2_tokenizer_path, sp, tmp_path):
    data = tmp_path / "mine.jsonl"
    data.write_text(json.dumps({"q": "Name a color.", "a": "Blue."}) + "\n"
                    + json.dumps({"q": "Add them.", "ctx": "2 and 3", "a": "5", "extra": 1}) + "\n")
    script_main("prepare_json")(data_file=data, tokenizer_path=llama2_tokenizer_path, destination_path=tmp_path / "o",
                                instruction_key="q", input_key="ctx", output_key="a", val_size=0)
    train, val = split_samples(tmp_path / "o")
    assert len(val) == 0
    assert [s["input_ids"].tolist() for s in train] == [expected_sample(sp, "Name a color.", "", "Blue.")[0],
                                                         expected_sample(sp, "Add them.", "2 and 3", "5")[0]]


# ---------------------------------------------------------------------------------- malformed input


def prepare(tmp_path, tokenizer_path, content, name="data.json", **kwargs):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return prepare_instruction_data(path, tmp_path / "out", tokenizer_path, val_size=0, **kwargs)


GOOD = {"instruction": "Say hi.", "output": "Hi."}


@pytest.mark.parametrize("name, content, message", [
    ("bad.json", '[{"instruction": "a", "output": "b"},\n {"instruction": "c" "output": "d"}]',
     r"bad.json is not valid JSON: Expecting ',' delimiter at line 2 column 22"),
    ("empty.json", "", r"empty.json is empty"),
    ("blank.jsonl", "\n  \r\n", r"blank.jsonl is empty"),
    ("dict.json", '{"records": [{"instruction": "a", "output": "b"}]}', r"dict.json: expected a JSON list of records, found a JSON object"),
    ("latin1.json", '[{"instruction": "caf\xe9", "output": "b"}]'.encode("latin-1"), r"latin1.json is not UTF-8 text \(bad byte at offset 21\)"),
])
def test_unreadable_files_raise_naming_the_file(tmp_path, llama2_tokenizer_path, name, content, message):
    with pytest.raises(ValueError, match=message):
        prepare(tmp_path, llama2_tokenizer_path, content, name, file_format="json" if name.endswith(".json") else "auto")


BAD_RECORDS = [  # (file name, content, where, problem): the second record is bad
    ("a.jsonl", json.dumps(GOOD) + "\n{not json}\n" + json.dumps(GOOD) + "\n", "line 2", r"not valid JSON \(Expecting property name"),
    ("a.json", json.dumps([GOOD, {"output": "x"}, GOOD]), "record 2", r"missing field 'instruction' \(the record has: output\)"),
    ("a.jsonl", json.dumps(GOOD) + "\n" + json.dumps({"instruction": "x", "response": "y"}) + "\n" + json.dumps(GOOD),
     "line 2", r"missing field 'output' \(the record has: instruction, response\)"),
    ("a.json", json.dumps([GOOD, {"instruction": "x", "output": 5}, GOOD]), "record 2", r"field 'output' is a JSON number, expected a string"),
    ("a.json", json.dumps([GOOD, {"instruction": "x", "input": ["y"], "output": "z"}, GOOD]), "record 2", r"field 'input' is a JSON array"),
    ("a.json", json.dumps([GOOD, {"instruction": None, "output": "z"}, GOOD]), "record 2", r"field 'instruction' is a JSON null"),
    ("a.json", json.dumps([GOOD, {"instruction": "x", "output": "  "}, GOOD]), "record 2", r"field 'output' is empty"),
    ("a.json", json.dumps([GOOD, "just text", GOOD]), "record 2", r"expected a JSON object, found a JSON string"),
    ("a.jsonl", "\r\n".join([json.dumps(GOOD), "[1, 2]", json.dumps(GOOD)]), "line 2", r"expected a JSON object, found a JSON array"),
]


@pytest.mark.parametrize("name, content, where, problem", BAD_RECORDS)
def test_bad_record_is_skipped_and_counted_or_fails_with_strict(tmp_path, llama2_tokenizer_path, name, content, where, problem):
    config = prepare(tmp_path, llama2_tokenizer_path, content, name)
    assert config["counts"]["records_read"] == 3 and config["counts"]["dropped_malformed"] == 1
    assert config["counts"]["kept"] == config["counts"]["train"] == 2
    assert len(config["skipped"]) == 1 and config["skipped"][0].startswith(f"{where}: ")
    assert re.search(problem, config["skipped"][0])
    with pytest.raises(ValueError, match=rf"{name}: {where}: {problem}.*leave out --strict"):
        prepare(tmp_path, llama2_tokenizer_path, content, name, strict=True)


def test_strict_stops_at_the_first_bad_record_and_all_bad_is_an_error(tmp_path, llama2_tokenizer_path):
    content = "\n".join([json.dumps(GOOD), "", json.dumps({"instruction": "x"}), "oops", json.dumps(GOOD)])
    with pytest.raises(ValueError, match=r"line 3: missing field 'output'"):
        prepare(tmp_path, llama2_tokenizer_path, content, "a.jsonl", strict=True)
    config = prepare(tmp_path, llama2_tokenizer_path, content, "a.jsonl")
    assert config["counts"]["records_read"] == 4  # the blank line is not a record
    assert [s.split(":")[0] for s in config["skipped"]] == ["line 3", "line 4"]
    with pytest.raises(ValueError, match=r"no usable record among 2 \(first problem: line 1: missing field 'output'"):
        prepare(tmp_path, llama2_tokenizer_path, '{"instruction": "x"}\n{"output": "y"}\n', "b.jsonl")


def test_bom_and_crlf_are_read_like_plain_utf8(tmp_path, llama2_tokenizer_path):
    records = [GOOD, {"instruction": "Translate: café", "input": "naïve\nline", "output": "Ça va."}]
    jsonl = "\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n"
    variants = {"plain.jsonl": jsonl.encode(), "bom.jsonl": b"\xef\xbb\xbf" + jsonl.encode(),
                "crlf.jsonl": jsonl.replace("\n", "\r\n").encode(),
                "bom_crlf.json": b"\xef\xbb\xbf" + json.dumps(records, indent=2).replace("\n", "\r\n").encode()}
    outputs = []
    for name, content in variants.items():
        config = prepare(tmp_path, llama2_tokenizer_path, content, name, strict=True)
        assert config["counts"]["kept"] == 2
        outputs.append((tmp_path / "out" / "train.safetensors").read_bytes())
    assert all(out == outputs[0] for out in outputs)


def test_read_examples_keeps_record_positions(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join([json.dumps(GOOD), "bad", json.dumps({"instruction": "i", "context": None, "response": "r"})]))
    examples, n_records, problems = read_examples(path, DOLLY_FIELDS)
    assert n_records == 3 and [e.position for e in examples] == [2] and (examples[0].input, examples[0].output) == ("", "r")
    assert problems[0].startswith("line 1: missing field 'response'") and problems[1].startswith("line 2: not valid JSON")
    with pytest.raises(ValueError, match="unknown file format 'xml'"):
        read_examples(path, file_format="xml")
    with pytest.raises(FileNotFoundError, match="data file not found: .*missing.json"):
        read_examples(tmp_path / "missing.json")


def test_cli_prints_one_line_error_and_exits_2(tmp_path, llama2_tokenizer_path):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps(GOOD) + "\n" + json.dumps({"instruction": "x", "output": 1}) + "\n")
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "prepare_json.py"), "--data_file", str(data),
                             "--tokenizer_path", str(llama2_tokenizer_path), "--destination_path", str(tmp_path / "o"),
                             "--strict", "true"], capture_output=True, text=True, env=subprocess_env())
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {data}: line 2: field 'output' is a JSON number, expected a string "
        "(fix it, or leave out --strict to skip bad records)"]
    assert not (tmp_path / "o").exists()  # nothing written


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"tokenizer not found: .*ckpt/tokenizer.model \(pass --checkpoint_dir"):
        script_main("prepare_alpaca")(data_file=tmp_path / "x.json", checkpoint_dir=tmp_path / "ckpt")


# ------------------------------------------------------------------------------ truncation and splits


def test_fit_sample_policies():
    prompt, response = [10, 11, 12], [20, 21, 22, 23]
    assert fit_sample(prompt, response, 1, 2, 9, "drop") == ([1, 10, 11, 12, 20, 21, 22, 23, 2], "kept")
    assert fit_sample(prompt, response, 1, 2, 8, "drop") == (None, "too_long")
    assert fit_sample(prompt, response, 1, 2, 8, "truncate_response") == ([1, 10, 11, 12, 20, 21, 22, 2], "truncated")
    assert fit_sample(prompt, response, 1, 2, 6, "truncate_response") == ([1, 10, 11, 12, 20, 2], "truncated")
    assert fit_sample(prompt, response, 1, 2, 5, "truncate_response") == (None, "prompt_too_long")


@pytest.mark.parametrize("truncation", ["drop", "truncate_response"])
def test_max_seq_length_on_alpaca_sample(shared_data, llama2_tokenizer_path, sp, tmp_path, truncation):
    data_file = shared_data / "alpaca" / "alpaca_data_sample.json"
    records = json.loads(data_file.read_text())
    max_len = 100
    config = prepare_instruction_data(data_file, tmp_path, llama2_tokenizer_path, max_seq_length=max_len,
                                      truncation=truncation, val_size=0)
    expected = [expected_sample(sp, r["instruction"], r["input"], r["output"]) for r in records]
    fits = [e for e in expected if len(e[0]) <= max_len]
    cut = [e for e in expected if len(e[0]) > max_len and e[1] + 2 <= max_len]
    counts = config["counts"]
    train, _ = split_samples(tmp_path)
    assert all(len(s["input_ids"]) <= max_len and s["input_ids"][-1] == sp.eos_id() for s in train)
    if truncation == "drop":
        assert (counts["kept"], counts["truncated"], counts["dropped_too_long"]) == (len(fits), 0, 102 - len(fits))
        assert [s["input_ids"].tolist() for s in train] == [e[0] for e in fits]
    else:
        assert len(cut) > 0 and counts["truncated"] == len(cut) and counts["kept"] == len(fits) + len(cut)
        assert counts["dropped_prompt_too_long"] == 102 - len(fits) - len(cut)
        for sample, (ids, prompt_length, _) in zip(train, [e for e in expected if e[1] + 2 <= max_len]):
            kept = sample["input_ids"].tolist()
            assert kept[:prompt_length] == ids[:prompt_length]  # the prompt is never cut
            assert kept[:-1] == ids[:len(kept) - 1]  # the response is cut at its tail, EOS still last
            assert sample["labels"].tolist()[prompt_length:] == kept[prompt_length:]


def test_val_split_is_seeded_and_independent_of_filtering(shared_data, llama2_tokenizer_path, tmp_path):
    assert choose_val_positions(100, 0.1, None, seed=1) == choose_val_positions(100, 0.1, None, seed=1)
    assert choose_val_positions(100, 0.1, None, seed=1) != choose_val_positions(100, 0.1, None, seed=2)
    assert len(choose_val_positions(100, 0.1, None, seed=1)) == 10
    assert choose_val_positions(100, 0.1, 3, seed=1) == choose_val_positions(100, 0.0, 3, seed=1)  # val_size wins
    assert len(choose_val_positions(100, 0.1, 3, seed=1)) == 3
    with pytest.raises(ValueError, match=r"val_split_fraction must be in \[0, 1\), got 1.5"):
        choose_val_positions(100, 1.5, None, seed=1)
    with pytest.raises(ValueError, match=r"val_size must be in \[0, 100\) for 100 records, got 100"):
        choose_val_positions(100, 0.1, 100, seed=1)

    data_file = shared_data / "alpaca" / "alpaca_data_sample.json"
    prepare_instruction_data(data_file, tmp_path / "long", llama2_tokenizer_path, val_size=20)
    prepare_instruction_data(data_file, tmp_path / "short", llama2_tokenizer_path, val_size=20, max_seq_length=120)
    val_long = {tuple(s["input_ids"].tolist()) for s in load_prepared(tmp_path / "long" / "val.safetensors")}
    val_short = {tuple(s["input_ids"].tolist()) for s in load_prepared(tmp_path / "short" / "val.safetensors")}
    assert len(val_long) == 20 and 0 < len(val_short) < 20 and val_short <= val_long


def test_no_training_sample_left_is_an_error(shared_data, llama2_tokenizer_path, tmp_path):
    with pytest.raises(ValueError, match=r"no training sample left with max_seq_length=20 \(median record length \d+"):
        prepare_instruction_data(shared_data / "alpaca" / "alpaca_data_sample.json", tmp_path, llama2_tokenizer_path,
                                 max_seq_length=20)
    assert not tmp_path.joinpath("train.safetensors").exists()


# ------------------------------------------------------------------------------------ downloads


def test_download_writes_atomically_and_fails_with_one_clear_line(tmp_path, monkeypatch):
    source = tmp_path / "remote.json"
    source.write_text(json.dumps([GOOD]))
    target = tmp_path / "data" / "alpaca_data.json"
    assert download_if_missing(source.as_uri(), target) == target and target.read_bytes() == source.read_bytes()
    source.unlink()
    assert download_if_missing(source.as_uri(), target).read_bytes() == json.dumps([GOOD]).encode()  # reused
    with pytest.raises(OSError, match=r"could not download file:///.*nowhere.json \(.*\): check your connection, "
                                      r"or download the file yourself and pass --data_file PATH"):
        download_if_missing((tmp_path / "nowhere.json").as_uri(), tmp_path / "new" / "out.json")
    assert not (tmp_path / "new" / "out.json").exists()

    class BrokenConnection(io.BytesIO):  # the connection drops in the middle of the transfer
        def read(self, *args):
            raise ConnectionResetError("connection reset by peer")

    monkeypatch.setattr("urllib.request.urlopen", lambda url, timeout: BrokenConnection())
    with pytest.raises(OSError, match=r"could not download https://example.com/a.json \(connection reset by peer\)"):
        download_if_missing("https://example.com/a.json", tmp_path / "cut" / "a.json")
    assert list((tmp_path / "cut").iterdir()) == []  # no partial or temporary file


def test_prepare_alpaca_downloads_when_no_data_file(shared_data, llama2_tokenizer_path, tmp_path):
    url = (shared_data / "alpaca" / "alpaca_data_sample.json").as_uri()
    config = script_main("prepare_alpaca")(data_url=url, tokenizer_path=llama2_tokenizer_path, destination_path=tmp_path)
    assert (tmp_path / "alpaca_data.json").is_file() and config["counts"]["kept"] == 102


# ------------------------------------------------------------------------------ loading and batching


def test_load_prepared_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"prepared data not found: .*train.safetensors \(run scripts/prepare_alpaca.py"):
        load_prepared(tmp_path / "train.safetensors")
    save_prepared(tmp_path / "good.safetensors", [[1, 5, 6, 2], [1, 7, 2]], [2, 2], mask_prompt=True)
    data = (tmp_path / "good.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut.safetensors is not a readable safetensors file"):
        load_prepared(tmp_path / "cut.safetensors")
    save_tensors({"weight": torch.zeros(2)}, tmp_path / "foreign.safetensors")
    with pytest.raises(ValueError, match=r"foreign.safetensors is not a lit-lora prepared data file"):
        load_prepared(tmp_path / "foreign.safetensors")
    header = {"lit_lora_prepared": json.dumps({"format": "lit-lora prepared instruction data", "version": 1,
                                                "mask_prompt": True, "ignore_index": -100})}
    save_file({"input_ids": torch.ones(5, dtype=torch.int32), "offsets": torch.tensor([0, 3, 9]),
               "prompt_lengths": torch.tensor([1, 1], dtype=torch.int32)}, str(tmp_path / "bad.safetensors"), header)
    with pytest.raises(ValueError, match=r"bad.safetensors is corrupt: its offsets/prompt_lengths do not fit"):
        load_prepared(tmp_path / "bad.safetensors")
    samples = load_prepared(tmp_path / "good.safetensors")
    assert [s["labels"].tolist() for s in samples] == [[-100, -100, 6, 2], [-100, -100, 2]]


def test_check_same_tokenizer(shared_data, llama2_tokenizer_path, tmp_path):
    prepare_instruction_data(shared_data / "dolly" / "databricks-dolly-sample.jsonl", tmp_path, llama2_tokenizer_path,
                             fields=DOLLY_FIELDS)
    check_same_tokenizer(tmp_path, llama2_tokenizer_path)
    other = tmp_path / "other.model"
    other.write_bytes(llama2_tokenizer_path.read_bytes() + b"\0")
    with pytest.raises(ValueError, match=r"was prepared with the tokenizer .*tokenizer.model, which differs from .*other.model"):
        check_same_tokenizer(tmp_path, other)


def test_collate_pads_right():
    batch = [{"input_ids": torch.tensor([1, 5, 6, 2]), "labels": torch.tensor([-100, -100, 6, 2])},
             {"input_ids": torch.tensor([1, 7]), "labels": torch.tensor([-100, 7])}]
    out = collate(batch, pad_id=0)
    assert out["input_ids"].tolist() == [[1, 5, 6, 2], [1, 7, 0, 0]]
    assert out["labels"].tolist() == [[-100, -100, 6, 2], [-100, 7, -100, -100]]
    assert collate(batch, pad_id=9, ignore_index=-1)["labels"].tolist()[1] == [-100, 7, -1, -1]


def test_dataloader_is_deterministic_and_covers_every_sample():
    samples = [{"input_ids": torch.full((n,), i), "labels": torch.full((n,), i)} for i, n in enumerate([3, 9, 1, 4, 7, 2, 8, 5, 6, 2])]

    def make_dataloader(samples, batch_size, shuffle, seed, group_by_length=False):  # BatchSampler in torch's DataLoader
        lengths = [len(sample["input_ids"]) for sample in samples]
        sampler = BatchSampler(lengths, batch_size, shuffle, seed, group_by_length)
        return torch.utils.data.DataLoader(samples, batch_sampler=sampler, collate_fn=collate)

    def epochs(loader, count=2):
        return [[b["input_ids"][:, 0].tolist() for b in loader] for _ in range(count)]

    first = epochs(make_dataloader(samples, 3, shuffle=True, seed=7))
    assert first == epochs(make_dataloader(samples, 3, shuffle=True, seed=7))
    assert first != epochs(make_dataloader(samples, 3, shuffle=True, seed=8))
    assert first[0] != first[1]  # each epoch draws a new order
    for epoch in first:
        assert sorted(i for batch in epoch for i in batch) == list(range(10)) and [len(b) for b in epoch] == [3, 3, 3, 1]
    assert epochs(make_dataloader(samples, 4, shuffle=False, seed=0), 1) == [[[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]]
    grouped = epochs(make_dataloader(samples, 3, shuffle=True, seed=7, group_by_length=True))
    for epoch in grouped:
        assert sorted(i for batch in epoch for i in batch) == list(range(10))
        assert 1 in epoch[0]  # the batch holding the longest sample (length 9) comes first
    assert list(make_dataloader([], 2, shuffle=True, seed=0, group_by_length=True)) == []  # an empty val split
    with pytest.raises(ValueError, match="batch_size must be at least 1, got 0"):
        make_dataloader(samples, 0, shuffle=True, seed=0)


def test_length_grouping_cuts_padding_on_alpaca(shared_data, llama2_tokenizer_path, tmp_path):
    data_file = shared_data / "alpaca" / "alpaca_data_sample.json"
    prepare_instruction_data(data_file, tmp_path, llama2_tokenizer_path, val_size=0)
    samples = load_prepared(tmp_path / "train.safetensors") * 4  # 408 samples: several length-sorted windows
    real_tokens = sum(len(s["input_ids"]) for s in samples)

    def padding(group_by_length: bool) -> float:
        sampler = BatchSampler([len(s["input_ids"]) for s in samples], 8, shuffle=True, seed=0, group_by_length=group_by_length)
        batches = sampler.batches(epoch=0)
        assert sorted(i for batch in batches for i in batch) == list(range(len(samples)))
        return 1 - real_tokens / sum(len(b) * max(len(samples[i]["input_ids"]) for i in b) for b in batches)

    random_padding, grouped_padding = padding(False), padding(True)
    assert random_padding > 0.3 and grouped_padding < random_padding / 4
