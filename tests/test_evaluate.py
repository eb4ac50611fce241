"""Evaluation: lit-lora's lm-eval model against the harness's own Hugging Face model, a local task run
offline, LoRA merged and unmerged, and perplexity against the validation loss training reports."""

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import make_hf_llama

from lit_lora.files.checkpoint import load_checkpoint
from lit_lora.tokenizer import Tokenizer


lm_eval = pytest.importorskip("lm_eval", reason='the optional extra: pip install -e ".[eval]"')
pytest.importorskip("google.protobuf", reason="transformers reads tokenizer.model through protobuf")

from lm_eval.api.instance import Instance  # noqa: E402

from lit_lora.evaluation.lm_eval_model import LitLM  # noqa: E402


@pytest.fixture(scope="module")
def twin_models(tmp_path_factory, llama2_tokenizer_path):
    """A tiny random Hugging Face Llama with the real tokenizer, and its lit-lora conversion."""
    import transformers

    from lit_lora.files.convert import convert_hf_checkpoint

    root = tmp_path_factory.mktemp("evaluate")
    hf = make_hf_llama(n_layer=2, vocab_size=32000, hidden_size=64)
    hf.save_pretrained(root / "hf")
    (root / "hf" / "tokenizer.model").write_bytes(llama2_tokenizer_path.read_bytes())
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(root / "hf"), add_bos_token=True)
    checkpoint = convert_hf_checkpoint(root / "hf", root / "lit")
    return hf, hf_tokenizer, checkpoint


def requests(kind, arguments):
    return [Instance(request_type=kind, doc={}, arguments=args, idx=i) for i, args in enumerate(arguments)]


LOGLIKELIHOOD = [
    ("Question: What is the capital of France?\nAnswer:", " Paris"),
    ("Question: What is the capital of France?\nAnswer:", " Berlin"),
    ("Answer:", "- yes"),  # the continuation's first characters merge with the context's last: ":-"
    ("The sum of 2 and 2 is ", "4"),  # a trailing space moves to the continuation
    ("", "Hello world"),  # an empty context: BOS alone
    ("Long " * 200, "context"),  # longer than the model's context: cut on the left
]


def test_loglikelihood_and_rolling_equal_the_harness_hf_model(twin_models, llama2_tokenizer_path):
    from lm_eval.models.huggingface import HFLM

    hf, hf_tokenizer, checkpoint = twin_models
    theirs = HFLM(pretrained=hf, tokenizer=hf_tokenizer, batch_size=2, device="cpu")
    ours = LitLM(load_checkpoint(checkpoint), Tokenizer(llama2_tokenizer_path), batch_size=3)
    assert ours.max_length == theirs.max_length == 128
    for (mine, my_greedy), (their, their_greedy) in zip(ours.loglikelihood(requests("loglikelihood", LOGLIKELIHOOD)),
                                                      theirs.loglikelihood(requests("loglikelihood", LOGLIKELIHOOD))):
        assert mine == pytest.approx(their, abs=1e-4) and my_greedy == their_greedy
    document = " ".join(f"Sentence number {i} is about llamas and their food." for i in range(40))  # ~500 tokens
    mine, = ours.loglikelihood_rolling(requests("loglikelihood_rolling", [(document,)]))
    their, = theirs.loglikelihood_rolling(requests("loglikelihood_rolling", [(document,)]))
    assert mine == pytest.approx(their, abs=1e-4) and mine < -100


TASK_YAML = """
task: llama_facts
dataset_path: json
dataset_kwargs:
  data_files: {data}
test_split: train
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""


def local_task(directory: Path) -> Path:
    records = [{"question": f"What do llamas number {i} eat?", "choices": [" grass", " rocks", " metal"], "answer": i % 3}
               for i in range(12)]
    (directory / "facts.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    (directory / "llama_facts.yaml").write_text(TASK_YAML.format(data=directory / "facts.jsonl"))
    return directory


def test_an_offline_local_task_scores_the_same_as_the_harness_hf_model(twin_models, llama2_tokenizer_path, tmp_path):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from lit_lora.evaluation.evaluate import main_metric, run_tasks

    hf, hf_tokenizer, checkpoint = twin_models
    tasks = local_task(tmp_path)
    ours = run_tasks(load_checkpoint(checkpoint), Tokenizer(llama2_tokenizer_path), ["llama_facts"], include_path=tasks)
    theirs = simple_evaluate(model=HFLM(pretrained=hf, tokenizer=hf_tokenizer, batch_size=4, device="cpu"),
                             tasks=["llama_facts"], task_manager=TaskManager(include_path=str(tasks)))
    assert main_metric(ours, "llama_facts") == main_metric(theirs, "llama_facts") is not None


def test_lora_merged_and_unmerged_score_alike_and_the_adapter_changes_the_scores(twin_models, llama2_tokenizer_path):
    from lit_lora.lora import LoRAConfig, add_lora, lora_layers, merge_lora

    _, _, checkpoint = twin_models
    tokenizer = Tokenizer(llama2_tokenizer_path)
    base = LitLM(load_checkpoint(checkpoint), tokenizer).loglikelihood(requests("loglikelihood", LOGLIKELIHOOD))
    model = load_checkpoint(checkpoint)
    add_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.0, targets=("q", "v")))
    torch.manual_seed(0)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.normal_(0.0, 0.5)
    unmerged = LitLM(model, tokenizer).loglikelihood(requests("loglikelihood", LOGLIKELIHOOD))
    merge_lora(model)
    merged = LitLM(model, tokenizer).loglikelihood(requests("loglikelihood", LOGLIKELIHOOD))
    assert [s for s, _ in merged] == pytest.approx([s for s, _ in unmerged], abs=1e-4)
    assert max(abs(a - b) for (a, _), (b, _) in zip(unmerged, base)) > 0.1


def test_perplexity_equals_exp_of_the_validation_loss_training_reports(tiny_run, tmp_path):
    from lit_lora.evaluation.evaluate import perplexity_of_prepared
    from lit_lora.lora import LoRAConfig
    from lit_lora.methods import apply_weights, finetune
    from lit_lora.train import TrainArgs

    metrics = finetune("lora", {"checkpoint_dir": tiny_run / "base", "data_dir": tiny_run / "data", "out_dir": tmp_path,
                                "accelerator": "cpu", "lora": LoRAConfig(r=4, alpha=8, dropout=0.0),
                                "train": TrainArgs(learning_rate=1e-2, global_batch_size=8, micro_batch_size=4,
                                                   warmup_steps=1, max_steps=3, eval_interval=1000, eval_iters=100,
                                                   seed=1, sample_instruction="Hi")})
    model = load_checkpoint(tiny_run / "base").eval()
    apply_weights(model, tmp_path / "lit_lora.safetensors")
    measured = perplexity_of_prepared(model, tiny_run / "data", batch_size=3)  # other batches: the same tokens
    assert measured == pytest.approx(math.exp(metrics["val_loss"]), rel=1e-4)
    assert measured == pytest.approx(metrics["val_ppl"], rel=1e-4)


def test_the_script_writes_results_and_says_what_is_missing(twin_models, llama2_tokenizer_path, tmp_path, capsys):
    import runpy

    root = Path(__file__).resolve().parents[1]
    main = runpy.run_path(str(root / "scripts" / "evaluate.py"))["main"]
    _, _, checkpoint = twin_models
    text = tmp_path / "notes.txt"
    text.write_text("Llamas eat grass. " * 100)
    scores = main(checkpoint_dir=checkpoint, tasks="llama_facts", include_path=local_task(tmp_path),
                  perplexity=text, out_dir=tmp_path / "out", dtype="float32", device="cpu", limit=6)
    assert set(scores) >= {"perplexity", "llama_facts"} and scores["perplexity"] > 1
    assert (tmp_path / "out" / "results.json").is_file() and "| llama_facts | acc |" in (tmp_path / "out" / "results.md").read_text()
    with pytest.raises(ValueError, match=r"unknown lm-eval tasks \['no_such_task'\]"):
        main(checkpoint_dir=checkpoint, tasks="no_such_task", out_dir=tmp_path / "out2", dtype="float32", device="cpu")


def test_compare_adds_perplexity_and_task_columns(tiny_run, tmp_path):
    from lit_lora.evaluation.compare import compare_methods, parse_variant

    budget = dict(max_steps=2, global_batch_size=8, micro_batch_size=4, warmup_steps=1, eval_interval=1000,
                  eval_iters=1, seed=1, save_interval=100)
    compare_methods(tiny_run / "base", tiny_run / "data", tmp_path / "compare", [parse_variant("lora-r2-qv")], budget,
                    accelerator="cpu", tasks=["llama_facts"], task_limit=6, include_path=local_task(tmp_path))
    rows = json.loads((tmp_path / "compare" / "comparison.json").read_text())["rows"]
    assert [row["method"] for row in rows] == ["base model (no finetuning)", "lora-r2-qv"]
    assert rows[1]["val perplexity"] != "-" and all(row["llama_facts"].endswith(" %") for row in rows)
