"""The quickstart (scripts/quickstart.py) end to end in its reduced `--fast` form, on the tiny model and on
SmolLM2-135M-Instruct, and the library pieces it stands on: the synthetic world (lit_lora/evaluation/synthetic.py),
the date task (lit_lora/evaluation/dates.py) and the comparison tools (lit_lora/evaluation/compare.py)."""

import datetime
import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch

from lit_lora.evaluation.compare import (ExactMatch, RunResult, Variant, comparison_rows, exact_match, markdown_table,
                                         parse_variant, side_by_side)
from lit_lora.evaluation.dates import FORMS, INSTRUCTION, SENTENCES, make_date_records, ordinal
from lit_lora.evaluation.synthetic import (TASKS, WorldConfig, build_world, pack_corpus, quiz_document, tokenizer_texts,
                                           train_tokenizer)
from lit_lora.lora import LoRAConfig, add_lora, lora_layers
from lit_lora.methods import lora_update_norms, read_weights, save_weights
from lit_lora.model import Config, Llama
from lit_lora.prompts import get_prompt_style
from lit_lora.tokenizer import Tokenizer


ROOT = Path(__file__).resolve().parents[1]
SMALL_WORLD = WorldConfig(seed=3, corpus_rounds=300, keys_per_task=40)


@pytest.fixture(scope="module")
def small_world():
    return build_world(SMALL_WORLD)


@pytest.fixture(scope="module")
def world_tokenizer(small_world, tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.model"
    return Tokenizer(train_tokenizer(tokenizer_texts(small_world, get_prompt_style()), path, vocab_size=512))


def test_held_out_instructions_appear_nowhere_in_training(small_world):
    """The test keys are in no train instruction and no quiz document; the corpus states them as prose only."""
    test_keys = {(fact.task, fact.key) for fact in small_world.test}
    assert not test_keys & {(fact.task, fact.key) for fact in small_world.train}
    corpus = set(small_world.corpus)
    for fact in small_world.test:
        assert quiz_document(fact) not in corpus and not any(fact.instruction in doc for doc in small_world.corpus)
    # facts drawn from small tables are all stated; of the others (counting, ...) the skill is what is taught
    assert all(fact.statement in corpus for fact in small_world.test if fact.task in ("addition", "conversion"))
    assert any(doc.startswith("Question:") for doc in small_world.corpus)  # training keys do get quizzes
    assert {fact.task for fact in small_world.test} == set(TASKS)


def test_answers_are_correct_and_the_world_is_reproducible(small_world):
    for fact in small_world.train + small_world.test:
        numbers = [int(word) for word in fact.instruction.rstrip("?.").replace(",", "").split() if word.isdigit()]
        if fact.task == "addition":
            assert int(fact.answer) == sum(numbers)
        elif fact.task == "larger":
            assert int(fact.answer) == max(numbers)
        elif fact.task == "counting":
            assert int(fact.answer) == len(fact.instruction.split(": ")[1].rstrip("?").split())
        elif fact.task == "reversing":
            assert fact.answer.split() == fact.instruction.split(": ")[1].split()[::-1]
        elif fact.task == "conversion":
            assert int(fact.answer) % numbers[0] == 0 and fact.answer.startswith(str(numbers[0]))
        assert fact.statement.endswith(".") and fact.answer in fact.statement
    again = build_world(SMALL_WORLD)
    assert again.corpus == small_world.corpus and again.test == small_world.test
    assert build_world(WorldConfig(seed=4, corpus_rounds=300, keys_per_task=40)).corpus != small_world.corpus


def test_tokenizer_is_llama_like_and_keeps_the_template_compact(world_tokenizer):
    tokenizer = world_tokenizer
    processor = tokenizer.processor
    assert (processor.unk_id(), processor.bos_id(), processor.eos_id(), processor.pad_id()) == (0, 1, 2, -1)
    prompt = get_prompt_style().format("What is 7 plus 5?")
    assert tokenizer.decode(tokenizer.encode(prompt, bos=True)) == prompt  # newlines survive
    assert len(tokenizer.encode(prompt, bos=False)) < 45  # template words are pieces, not letters
    assert tokenizer.decode(tokenizer.encode("naïve ✓", bos=False)) == "naïve ✓"  # byte fallback


def test_pack_corpus_makes_full_blocks_of_whole_documents(small_world, world_tokenizer):
    train, val = pack_corpus(small_world.corpus, world_tokenizer, sequence_length=32)
    stream = torch.cat([sample["input_ids"] for sample in train + val])
    assert all(sample["input_ids"].shape == (32,) and sample["labels"] is sample["input_ids"] for sample in train)
    assert len(val) >= 1 and stream[0] == world_tokenizer.bos_id
    first = world_tokenizer.encode(small_world.corpus[0], bos=True, eos=True).tolist()
    assert stream[: len(first)].tolist() == first


def test_lora_update_norms_match_the_dense_update(tmp_path):
    torch.manual_seed(0)
    model = Llama(Config(n_layer=2, n_head=2, n_embd=16, vocab_size=32, block_size=16, intermediate_size=24))
    config = LoRAConfig(r=4, alpha=12, targets=("q", "v", "down"))
    add_lora(model, config)
    for layer in lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_B)
    save_weights(tmp_path / "lora.safetensors", model, "lora", config)
    weights = read_weights(tmp_path / "lora.safetensors")
    projections, layers, norms = lora_update_norms(weights.config, weights.model_config, weights.tensors)
    assert projections == ["q_proj", "v_proj", "down_proj"] and layers == ["0", "1"]
    for row, (target, module) in enumerate((("q", "attn.q_proj"), ("v", "attn.v_proj"), ("down", "mlp.down_proj"))):
        for layer in range(2):
            lora = model.get_submodule(f"layers.{layer}.{module}")
            dense = 3.0 * (lora.lora_B @ lora.lora_A)  # alpha / r = 3
            torch.testing.assert_close(norms[row, layer].item(), torch.linalg.norm(dense).item(), rtol=1e-5, atol=0)


def test_exact_match_batches_equal_length_prompts_like_one_at_a_time(world_tokenizer):
    """Batched greedy answers equal answers generated prompt by prompt, and scoring is strict."""
    from lit_lora.generate import generate

    torch.manual_seed(0)
    model = Llama(Config(n_layer=2, n_head=2, n_embd=32, vocab_size=512, block_size=96)).eval()
    style = get_prompt_style()
    records = [{"instruction": f"What is {a} plus {b}?", "answer": "x", "task": "addition"}
               for a, b in ((1, 2), (3, 4), (5, 6), (12, 9))]
    records.append({"instruction": "Reverse the words: cat dog", "answer": "x", "task": "rev"})
    result = exact_match(model, world_tokenizer, style, records, max_new_tokens=6, batch_size=2)
    for record, row in zip(records, result.predictions):
        ids = world_tokenizer.encode(style.format(record["instruction"]), bos=True)
        new = generate(model, ids, 6, temperature=0.0, eos_id=world_tokenizer.eos_id)[len(ids):].tolist()
        assert row["prediction"] == world_tokenizer.decode([t for t in new if t != world_tokenizer.eos_id])
    records = [{**record, "answer": f"  {row['prediction']} "} for record, row in zip(records, result.predictions)]
    rescored = exact_match(model, world_tokenizer, style, records, max_new_tokens=6)
    assert rescored.correct == 5 and rescored.per_task == {"addition": (4, 4), "rev": (1, 1)}
    records[0]["answer"] = records[0]["answer"].strip() + "."
    assert exact_match(model, world_tokenizer, style, records, max_new_tokens=6).correct == 4


def test_variants_and_table():
    assert parse_variant("lora") == Variant("lora", "lora")
    assert parse_variant("lora-r64-qv").settings["lora"] == LoRAConfig(r=64, alpha=128, dropout=0.05,
                                                                       targets=("q", "v"))
    assert parse_variant("lora-r8-all").settings["lora"].targets == ("q", "k", "v", "o", "gate", "up", "down")
    with pytest.raises(ValueError, match="unknown method 'qlora'"):
        parse_variant("qlora")
    run = RunResult("LoRA", "lora", metrics={"trainable_parameters": 50, "total_parameters": 1000,
                                             "seconds_per_step": 0.5, "val_loss": 1.25},
                    peak_memory={"gb": 1.5, "kind": "GPU"})
    rows = comparison_rows([RunResult("base", "base"), run])
    assert rows[1]["% of total"] == "5.00 %" and rows[1]["peak memory"] == "1.50 GB GPU"
    assert rows[0]["trainable params"] == "0" and rows[1]["accuracy"] == "-"
    table = markdown_table(rows).splitlines()
    assert table[0].startswith("| method | trainable params |") and len(table) == 4


# Python's own date parser reads each written form (the ordinal suffix taken off first): an independent check.
STRPTIME_FORMS = {"Month D, YYYY": "%B %d, %Y", "D Month YYYY": "%d %B %Y", "the Dth of Month YYYY": "the %d of %B %Y",
                  "Mon D, YYYY": "%b %d, %Y", "Dth Month, YYYY": "%d %B, %Y"}


def test_date_records_are_right_held_out_and_reproducible():
    train, test = make_date_records(400, 60, seed=5)
    assert set(STRPTIME_FORMS) == set(FORMS) and {r["task"] for r in train} == set(FORMS)
    for record in train + test:
        assert record["instruction"] == INSTRUCTION
        written = next(record["input"][len(before):len(record["input"]) - len(after)]
                       for before, after in (sentence.split("{date}") for sentence in SENTENCES)
                       if record["input"].startswith(before) and record["input"].endswith(after))
        unsuffixed = re.sub(r"(\d+)(st|nd|rd|th)\b", r"\1", written)
        parsed = datetime.datetime.strptime(unsuffixed, STRPTIME_FORMS[record["task"]]).date()
        assert record["output"] == parsed.isoformat() and re.fullmatch(r"\d{4}-\d\d-\d\d", record["output"])
    assert not {r["output"] for r in test} & {r["output"] for r in train}  # held-out dates never trained on
    assert len({r["output"] for r in train + test}) == 460
    again_train, again_test = make_date_records(10, 60, seed=5)
    assert again_test == test and again_train == train[:10]  # the test set does not depend on the train size
    assert make_date_records(10, 60, seed=6)[1] != test
    ordinals = {1: "1st", 2: "2nd", 3: "3rd", 4: "4th", 11: "11th", 12: "12th", 13: "13th", 21: "21st", 22: "22nd",
                23: "23rd", 24: "24th", 30: "30th", 31: "31st"}
    assert {day: ordinal(day) for day in ordinals} == ordinals
    with pytest.raises(ValueError, match="must be positive"):
        make_date_records(0, 5)


def test_side_by_side_lists_each_models_answer_and_marks_the_wrong_ones():
    def scored(name, predictions):
        rows = [{"instruction": "Say it.", "input": f"prompt {i} | x", "answer": "yes", "prediction": p,
                 "correct": p == "yes"} for i, p in enumerate(predictions)]
        return RunResult(name, "lora", accuracy=ExactMatch(sum(r["correct"] for r in rows), len(rows), {}, rows))

    table = side_by_side([scored("base", ["no", "maybe\nso"]), scored("LoRA", ["yes", "yes"])], count=5).splitlines()
    assert table[0] == "| prompt | expected | base | LoRA |" and len(table) == 4
    assert table[2] == "| prompt 0 \\| x | yes | no ✗ | yes |" and table[3].endswith("| maybe so ✗ | yes |")
    assert side_by_side([RunResult("base", "base")]) is None


def _run_quickstart(out: Path, **arguments):
    spec = importlib.util.spec_from_file_location("quickstart", ROOT / "scripts" / "quickstart.py")
    quickstart = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quickstart)
    return quickstart.main(out_dir=out, fast=True, accelerator="cpu", **arguments)


@pytest.mark.slow
def test_quickstart_on_smollm2_fast_runs_end_to_end(tmp_path, capsys, smollm2_checkpoint):
    """The default quickstart, reduced, on the real SmolLM2-135M-Instruct: the date task in ChatML, three
    finetuned models, the table with the answers side by side, the merged LoRA answering like the file."""
    out = tmp_path / "quickstart"
    result = _run_quickstart(out, checkpoint_dir=smollm2_checkpoint)
    log = capsys.readouterr().out
    assert all(f"Step {step}/7" in log for step in range(1, 8)) and "prompts in its chat format, 'chatml'" in log
    report = json.loads((out / "comparison.json").read_text())
    assert [row["method"] for row in report["rows"]] == [
        "base model (no finetuning)", "LoRA (r=8, q and v)", "DoRA (r=8, q and v)",
        "LLaMA-Adapter (10 prompt tokens, top 10 layers)"]
    assert set(result["accuracy"]) == {row["method"] for row in report["rows"]}
    table = (out / "comparison.md").read_text()
    assert "| prompt | expected | base model (no finetuning) | LoRA (r=8, q and v) |" in table
    first = json.loads((out / "task" / "test.json").read_text())[0]
    assert f"| {first['input']} | {first['output']} |" in table
    assert (out / "data" / "prepare_config.json").is_file() and '"chatml"' in (out / "data" / "prepare_config.json").read_text()
    assert "the same as the base with the LoRA file" in log


@pytest.mark.slow
def test_quickstart_fast_runs_end_to_end_and_reruns_identically(tmp_path, capsys):
    out = tmp_path / "quickstart"
    _run_quickstart(out, tiny=True)
    first_log = capsys.readouterr().out
    for step in range(1, 8):
        assert f"Step {step}/7" in first_log
    first = json.loads((out / "comparison.json").read_text())
    assert [row["method"] for row in first["rows"]] == [
        "base model (no finetuning)", "LoRA (r=8, all linear layers)", "DoRA (r=8, all linear layers)",
        "LLaMA-Adapter (10 prompt tokens, all layers)"]
    assert int(first["rows"][2]["trainable params"].replace(",", "")) > int(first["rows"][1]["trainable params"].replace(",", ""))
    table = (out / "comparison.md").read_text()
    assert all(f"| {row['method']} | {row['trainable params']} |" in table for row in first["rows"])
    for picture in ("loss_curves.png", "lora_update_heatmap.png", "dora_update_heatmap.png"):
        assert (out / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (out / picture).stat().st_size > 10_000
    assert (out / "lora" / "lit_lora.safetensors").is_file() and (out / "adapter" / "lit_adapter.safetensors").is_file()
    assert (out / "merged" / "lit_model.safetensors").is_file()
    assert "the same as the base with the LoRA file" in first_log

    _run_quickstart(out, tiny=True)  # the second run reuses the pretrained base and repeats every number but the measured ones
    assert "reusing the base pretrained" in capsys.readouterr().out
    second = json.loads((out / "comparison.json").read_text())
    measured = ("peak memory", "s / step")

    def repeatable(rows):
        return [{key: value for key, value in row.items() if key not in measured} for row in rows]

    assert len(second["rows"]) == 4 and repeatable(second["rows"]) == repeatable(first["rows"])
    predictions = [[run["accuracy"]["predictions"] for run in result["runs"]] for result in (first, second)]
    assert predictions[0] == predictions[1]

    # scripts/compare.py on the quickstart's checkpoint and data: new runs beside a finished one
    spec = importlib.util.spec_from_file_location("compare_script", ROOT / "scripts" / "compare.py")
    compare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare)
    compare.main(checkpoint_dir=out / "base" / "checkpoint", data_dir=out / "data", out_dir=tmp_path / "compare",
                 methods=["lora-r4-qv", "full"], include=[out / "adapter"], learning_rates={"full": 1e-3},
                 max_steps=3, global_batch_size=8, micro_batch_size=4, warmup_steps=1, eval_interval=2, eval_iters=1,
                 eval_file=out / "world" / "test.json", max_new_tokens=4, accelerator="cpu")
    rows = json.loads((tmp_path / "compare" / "comparison.json").read_text())["rows"]
    assert [row["method"] for row in rows] == ["base model (no finetuning)", "lora-r4-qv", "full", str(out / "adapter")]
    assert rows[2]["% of total"] == "100.00 %" and rows[1]["trainable params"] == f"{4 * 2 * 4 * (128 + 128):,}"
    assert rows[3]["final val loss"] == first["rows"][3]["final val loss"]  # the included run, as it was
    assert all(row["accuracy"].endswith("/120)") for row in rows)
    assert (tmp_path / "compare" / "lora_update_heatmap_lora-r4-qv.png").is_file()
