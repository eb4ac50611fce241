"""What a new user and a red team ran into: runs that hung, tracebacks instead of one line, and results that
were silently wrong. One test per cause; each fails on the code before the fix."""

import io
import json
import os
import re
import runpy
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from lit_lora.files.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, save_json
from lit_lora.lora import LoRAConfig, add_lora
from lit_lora.methods import finetune, save_weights
from lit_lora.train import TrainArgs
from lit_lora.workflows.cli import run


ROOT = Path(__file__).resolve().parents[1]


def train_args(**overrides):
    values = dict(learning_rate=2e-2, global_batch_size=8, micro_batch_size=4, warmup_steps=1, max_steps=4,
                  eval_interval=1000, eval_iters=1, save_interval=1000, seed=7, sample_instruction="Say hi.")
    return TrainArgs(**{**values, **overrides})


def lora_run(tiny_run, out_dir, data_dir=None, **arguments):
    return finetune("lora", {"checkpoint_dir": tiny_run / "base", "data_dir": data_dir or tiny_run / "data",
                             "out_dir": out_dir, "accelerator": "cpu", "lora": LoRAConfig(r=2, alpha=4, dropout=0.0),
                             "train": train_args(), **arguments})


def script_main(path):
    return runpy.run_path(str(ROOT / path))["main"]


def one_line_error(main, argv, monkeypatch, capsys):
    """The "error: ..." line a script's `main` ends with through the command line runner (notes may come first)."""
    monkeypatch.setattr(sys, "argv", ["script", *map(str, argv)])
    with pytest.raises(SystemExit) as exited:
        run(main)
    err = capsys.readouterr().err.strip().splitlines()
    assert exited.value.code == 2 and err and err[-1].startswith("error: "), err
    return err[-1]


def finishes_within(seconds, function):
    """Run `function` in a thread; (finished in time, its result or exception). A hang fails, not blocks."""
    outcome = {}

    def target():
        try:
            outcome["value"] = function()
        except BaseException as error:  # noqa: BLE001 - handed to the test
            outcome["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    return not thread.is_alive(), outcome


def prepared(tmp_path, shared_data, llama2_tokenizer_path, records=None, **settings):
    from lit_lora.workflows.prepare import prepare_instruction_data

    source = shared_data / "alpaca" / "alpaca_data_sample.json"
    if records is not None:
        source = tmp_path / "few.json"
        source.write_text(json.dumps(json.loads((shared_data / "alpaca" / "alpaca_data_sample.json").read_text())[:records]))
    prepare_instruction_data(source, tmp_path / "data", llama2_tokenizer_path, **{"max_seq_length": 128, "seed": 42,
                                                                                 **settings})
    return tmp_path / "data"


# ---- 1. a step larger than the data -----------------------------------------------------------------------

def test_1_a_step_needing_more_micro_batches_than_an_epoch_holds_is_refused_at_start(tiny_run, tmp_path, shared_data,
                                                                                    llama2_tokenizer_path):
    data = prepared(tmp_path, shared_data, llama2_tokenizer_path, records=10)
    done, outcome = finishes_within(120, lambda: lora_run(tiny_run, tmp_path / "out", data_dir=data,
                                                          train=train_args(global_batch_size=128, max_steps=None)))
    assert done, "training on 10 records with a global batch of 128 hangs"
    error = outcome.get("error")
    assert isinstance(error, ValueError), outcome
    assert "one optimizer step needs 128 samples" in str(error), str(error)
    assert re.search(r"the \d+ training samples make only \d micro-batches per epoch: lower --train.global_batch_size "
                     r"to \d+ or less", str(error)), str(error)
    assert not (tmp_path / "out" / "checkpoints").exists()


# ---- 2. the C++ decoding kernels: stale locks, bad cached libraries, no compiler -----------------------------

def _fresh_kernels(monkeypatch, tmp_path, compiler):
    """row_kernels() uncached, with its own extensions folder and the given compiler."""
    from lit_lora.speed.row_kernels import row_kernels

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "extensions"))
    monkeypatch.setenv("CXX", compiler)
    return row_kernels.__wrapped__


def _loaded_kernel_library():
    """The kernels' library this process loaded (the test session's real build), from /proc/self/maps."""
    from lit_lora.speed.row_kernels import row_kernels

    if row_kernels().int8_rows is None:
        pytest.skip("the C++ decoding kernels could not be built here")
    for line in Path("/proc/self/maps").read_text().splitlines():
        path = line.split()[-1]
        if "lit_lora_row_kernels_" in path and path.endswith(".so"):
            return Path(path)
    pytest.skip("the kernels' library is not mapped from a file here")


def test_2_a_lock_left_by_a_killed_kernel_build_is_removed_not_waited_on(monkeypatch, tmp_path, capsys):
    build = _fresh_kernels(monkeypatch, tmp_path, "/bin/false")  # a compiler that fails at once: no 40 s build
    from torch.utils import cpp_extension

    names = {f"lit_lora_row_kernels_{variant}" for variant in ("plain", "avx2", "avx512bf16")}
    locks = [Path(cpp_extension._get_build_directory(name, verbose=False)) / "lock" for name in names]
    for lock in locks:
        lock.write_text("")
        os.utime(lock, (time.time() - 3600, time.time() - 3600))  # left an hour ago by a build killed with -9
    done, outcome = finishes_within(120, build)
    assert done, "the kernel build waits forever on the lock a killed build left"
    assert outcome.get("value") == (None, None), outcome
    err = capsys.readouterr().err
    assert "building the decoding kernels (first use, ~40 s)" in err and "could not be built" in err
    assert sum(lock.exists() for lock in locks) == len(locks) - 1  # this CPU's variant's lock: removed


def test_2_no_compiler_is_said_plainly(monkeypatch, tmp_path, capsys):
    build = _fresh_kernels(monkeypatch, tmp_path, str(tmp_path / "no-such-c++"))
    assert build() == (None, None)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no C++ compiler found" in err[0] and "slower products" in err[0], err


KERNELS_IN_CHILD = """
import lit_lora.speed.row_kernels as module
module.BUILD_TIMEOUT_S = 5  # a rebuild, if one starts, is cut short: the test checks what happens before it
kernels = module.row_kernels()
print("kernels:", kernels.int8_rows is not None)
"""


@pytest.mark.parametrize("damage", ["truncated", "foreign"])
def test_2_a_truncated_or_foreign_cached_kernel_library_is_never_loaded(tmp_path, damage):
    library = _loaded_kernel_library()
    build_dir = tmp_path / "extensions" / library.parent.name
    shutil.copytree(library.parent, build_dir, ignore=shutil.ignore_patterns("lock"))  # the cache as a killed build left it
    copy = build_dir / library.name
    if damage == "truncated":
        copy.write_bytes(library.read_bytes()[: library.stat().st_size // 2])
    else:  # another library under the same name: valid, but without the kernels
        shutil.copyfile(Path(torch.__file__).parent / "lib" / "libshm.so", copy)
    built = library.stat()
    os.utime(copy, ns=(built.st_atime_ns, built.st_mtime_ns))  # the time ninja logged: it sees nothing to rebuild
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "extensions"), "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", KERNELS_IN_CHILD], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])  # not 135 (bus error), not a traceback
    assert "kernels:" in done.stdout
    assert "building them again" in done.stderr


# ---- 3. conversations with many turns ---------------------------------------------------------------------

def test_3_preparing_a_long_conversation_is_linear_in_its_turns(tmp_path, llama2_tokenizer_path, monkeypatch):
    from lit_lora.tokenizer import Tokenizer
    from lit_lora.workflows.conversations import prepare_conversation_data

    turns = 300
    messages = []
    for turn in range(turns):
        messages += [{"role": "user", "content": f"Question number {turn}?"},
                     {"role": "assistant", "content": f"Answer number {turn}."}]
    (tmp_path / "chat.jsonl").write_text("\n".join(json.dumps({"messages": messages}) for _ in range(2)) + "\n")
    real_encode, calls = Tokenizer.encode, []

    def counted(self, *args, **kwargs):
        calls.append(1)
        return real_encode(self, *args, **kwargs)

    monkeypatch.setattr(Tokenizer, "encode", counted)
    config = prepare_conversation_data(tmp_path / "chat.jsonl", tmp_path / "out", llama2_tokenizer_path,
                                       max_seq_length=64, val_size=0)
    assert config["counts"]["truncated"] == 2
    assert len(calls) <= 2 * 6 * turns, f"{len(calls)} encodings for 2 conversations of {turns} exchanges"


# ---- 4. chat input, ShareGPT and PEFT configs of the wrong shape --------------------------------------------

class InterruptedStdin(io.StringIO):
    """Lines, then Ctrl-C at the prompt."""

    def readline(self, *args):
        line = super().readline(*args)
        if not line:
            raise KeyboardInterrupt
        return line


def test_4_ctrl_c_in_chat_stops_the_answer_or_leaves_without_a_traceback(tiny_run, monkeypatch, capsys):
    main = script_main("generate/chat.py")
    real_streamer, calls = main.__globals__["TextStreamer"], []

    class InterruptFirstAnswer(real_streamer):
        def __call__(self, next_ids):
            calls.append(1)
            if len(calls) == 2:
                raise KeyboardInterrupt
            return super().__call__(next_ids)

    main.__globals__["TextStreamer"] = InterruptFirstAnswer
    monkeypatch.setattr(sys, "stdin", InterruptedStdin("Hello\nHello again\n"))
    answers = main(checkpoint_dir=tiny_run / "base", temperature=0.0, max_new_tokens=4, dtype="float32", device="cpu")
    assert len(answers) == 1  # the interrupted answer is dropped, the next one comes, Ctrl-C at the prompt leaves
    assert "interrupted" in capsys.readouterr().err


def test_4_chat_input_that_is_not_utf8_is_refused_per_line(tiny_run, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"caf\xe9 au lait\nHello\n"), encoding="utf-8"))
    answers = script_main("generate/chat.py")(checkpoint_dir=tiny_run / "base", temperature=0.0, max_new_tokens=4,
                                              dtype="float32", device="cpu")
    assert len(answers) == 1 and "not UTF-8 text" in capsys.readouterr().err


def test_4_chat_with_its_input_closed_is_one_line(tiny_run, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", None)
    line = one_line_error(script_main("generate/chat.py"), ["--checkpoint_dir", tiny_run / "base"], monkeypatch, capsys)
    assert "standard input, which is closed" in line


def test_4_a_sharegpt_from_that_is_a_list_is_a_skipped_record(tmp_path, llama2_tokenizer_path):
    from lit_lora.workflows.conversations import prepare_conversation_data

    good = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]}
    bad = {"conversations": [{"from": ["human"], "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]}
    (tmp_path / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in (good, bad, good)) + "\n")
    config = prepare_conversation_data(tmp_path / "chat.jsonl", tmp_path / "out", llama2_tokenizer_path, val_size=0)
    assert config["counts"]["dropped_malformed"] == 1 and "unknown role None" in config["skipped"][0]


@pytest.mark.parametrize("key", ["rank_pattern", "alpha_pattern"])
def test_4_a_peft_pattern_given_as_a_list_is_a_one_line_error(tmp_path, key):
    from lit_lora.lora import lora_state_shapes
    from lit_lora.model import Config
    from lit_lora.workflows.peft import load_peft_adapter, save_peft_adapter

    config = Config.from_name("tiny", vocab_size=128)
    lora = LoRAConfig(r=2, alpha=4, targets=("q", "v"))
    save_peft_adapter(tmp_path, lora, {name: torch.zeros(shape) for name, shape in lora_state_shapes(config, lora).items()})
    adapter_config = json.loads((tmp_path / "adapter_config.json").read_text())
    save_json({**adapter_config, key: ["q_proj"]}, tmp_path / "adapter_config.json")
    with pytest.raises(CheckpointError, match=rf"{key} must be a JSON object mapping module name patterns"):
        load_peft_adapter(tmp_path, config)


# ---- 5. weights that are finite in the file but overflow in use ----------------------------------------------

@pytest.fixture(scope="module")
def overflowing(tiny_run, tmp_path_factory):
    """A base whose norm weight overflows float16 (finite in its float32 file), and a LoRA of 1e30."""
    root = tmp_path_factory.mktemp("overflow")
    model = load_checkpoint(tiny_run / "base")
    state = {**model.state_dict(), "norm.weight": torch.full_like(model.norm.weight, 1e6)}
    save_checkpoint(root / "big", state, model.config, tokenizer_path=tiny_run / "base" / "tokenizer.model")
    lora = LoRAConfig(r=2, alpha=4, dropout=0.0)
    add_lora(model, lora)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.fill_(1e30)  # finite in the file; B A = 2e60 is not
    save_weights(root / "huge.safetensors", model, "lora", lora)
    (root / "text.txt").write_text("The capital of France is Paris. " * 4)
    return root


def test_5_greedy_decoding_on_overflowing_weights_stops_naming_the_file(overflowing, monkeypatch, capsys):
    line = one_line_error(script_main("generate/base.py"), ["--checkpoint_dir", overflowing / "big", "--dtype", "float16",
                          "--temperature", "0", "--max_new_tokens", "3", "--device", "cpu"], monkeypatch, capsys)
    assert "big/lit_model.safetensors: the model's logits are NaN or infinite" in line


def test_5_sampling_with_an_overflowing_lora_stops_naming_the_files(tiny_run, overflowing, monkeypatch, capsys):
    line = one_line_error(script_main("generate/lora.py"), ["--checkpoint_dir", tiny_run / "base", "--lora_path",
                          overflowing / "huge.safetensors", "--max_new_tokens", "3", "--dtype", "float32",
                          "--device", "cpu"], monkeypatch, capsys)
    assert "huge.safetensors: the model's logits are NaN or infinite" in line and "base/lit_model.safetensors" in line


def test_5_perplexity_of_overflowing_weights_is_an_error_not_null(overflowing, tmp_path, monkeypatch, capsys):
    line = one_line_error(script_main("scripts/evaluate.py"), ["--checkpoint_dir", overflowing / "big", "--dtype",
                          "float16", "--perplexity", overflowing / "text.txt", "--out_dir", tmp_path / "eval",
                          "--device", "cpu"], monkeypatch, capsys)
    assert "the model's logits are NaN or infinite, so there is no perplexity" in line
    assert not (tmp_path / "eval" / "scores.json").exists()


# ---- 6. NaN weights passed on, and the last good checkpoint --------------------------------------------------

def test_6_convert_hf_checkpoint_refuses_nan_weights(tmp_path, hf_llama_factory):
    from lit_lora.files.convert import convert_hf_checkpoint

    hf_model = hf_llama_factory()
    with torch.no_grad():
        hf_model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    hf_model.save_pretrained(tmp_path / "hf")
    with pytest.raises(CheckpointError, match=r"holds NaN or infinite values in layers.1.mlp.up_proj.weight"):
        convert_hf_checkpoint(tmp_path / "hf", tmp_path / "lit")
    assert not (tmp_path / "lit" / "lit_model.safetensors").exists()


def test_6_convert_lit_checkpoint_refuses_nan_weights(tiny_run, tmp_path):
    from lit_lora.files.checkpoint import save_tensors
    from lit_lora.files.convert import convert_lit_checkpoint

    shutil.copytree(tiny_run / "base", tmp_path / "lit")
    model = load_checkpoint(tiny_run / "base")
    state = {**model.state_dict(), "norm.weight": torch.full_like(model.norm.weight, float("nan"))}
    save_tensors(state, tmp_path / "lit" / "lit_model.safetensors")  # as a foreign tool might
    with pytest.raises(CheckpointError, match=r"holds NaN or infinite values in model.norm.weight"):
        convert_lit_checkpoint(tmp_path / "lit", tmp_path / "hf")
    assert not (tmp_path / "hf" / "model.safetensors").exists()


def test_6_resuming_a_checkpoint_with_nan_weights_is_refused_naming_it(tiny_run, tmp_path):
    lora_run(tiny_run, tmp_path / "first", train=train_args(max_steps=2, save_interval=1))
    checkpoint = tmp_path / "first" / "checkpoints" / "step-000002.ckpt"
    saved = torch.load(checkpoint, weights_only=True)
    name = next(iter(saved["model"]))
    saved["model"][name] = torch.full_like(saved["model"][name], float("nan"))
    torch.save(saved, checkpoint)
    with pytest.raises(CheckpointError, match=rf"step-000002.ckpt holds NaN or infinite values in {name}"):
        lora_run(tiny_run, tmp_path / "second", resume=str(checkpoint), train=train_args(max_steps=4))


def test_6_a_divergence_names_the_checkpoint_from_before_the_loss_climbed(tiny_run, tmp_path, monkeypatch):
    import lit_lora.train as train_module

    real_loss_fn, calls = train_module.loss_fn, []

    def climbing_then_nan(logits, labels, compiled=False):  # 1 validation batch, then 2 micro-batches per step
        calls.append(1)
        step = (len(calls) - 2) // 2 + 1 if len(calls) > 1 else 0
        loss = real_loss_fn(logits, labels, compiled)
        if step >= 7:
            return loss * float("nan")
        return loss * (10.0 ** max(0, step - 3))  # steps 4, 5, 6: the loss climbs tenfold per step

    monkeypatch.setattr(train_module, "loss_fn", climbing_then_nan)
    out = tmp_path / "diverged"
    with pytest.raises(FloatingPointError, match=r"at step 7") as error:
        lora_run(tiny_run, out, train=train_args(save_interval=1, max_steps=10))
    named = str(error.value).split("Last good checkpoint: ")[1].split(" ")[0]
    assert Path(named).is_file() and int(Path(named).name[5:11]) <= 3, str(error.value)


# ---- 7. packing toggled on resume ------------------------------------------------------------------------

def test_7_resuming_with_packing_toggled_says_so(tiny_run, tmp_path, capsys):
    out = tmp_path / "packed"
    lora_run(tiny_run, out, train=train_args(max_steps=2, save_interval=1, max_time=1e-9))  # stops after a step
    capsys.readouterr()
    lora_run(tiny_run, out, resume="auto", train=train_args(max_steps=3, packing=True))
    printed = capsys.readouterr().out
    assert "'packing': True" in printed and "differ from the checkpoint's" in printed


# ---- 8. small-data traps ---------------------------------------------------------------------------------

def test_8_an_empty_validation_split_is_a_note_at_start(tiny_run, tmp_path, shared_data, llama2_tokenizer_path, capsys):
    data = prepared(tmp_path, shared_data, llama2_tokenizer_path, records=10)  # 3.9 % of 10 records: none
    lora_run(tiny_run, tmp_path / "out", data_dir=data, train=train_args(global_batch_size=4, max_steps=1))
    assert "note: the prepared data has no validation samples" in capsys.readouterr().out


def test_8_warmup_longer_than_the_run_is_a_note_at_start(tiny_run, tmp_path, capsys):
    lora_run(tiny_run, tmp_path / "out", train=train_args(max_steps=2, warmup_steps=100))
    assert "--train.warmup_steps 100 is more than this run's 2 steps" in capsys.readouterr().out


def test_8_max_seq_length_above_the_models_context_is_a_note(tiny_run, tmp_path, shared_data, capsys):
    main = script_main("scripts/prepare_alpaca.py")
    main(data_file=shared_data / "alpaca" / "alpaca_data_sample.json", destination_path=tmp_path / "data",
         checkpoint_dir=tiny_run / "base", max_seq_length=1024)
    assert "--max_seq_length 1024 is above the context of the model" in capsys.readouterr().err


# ---- 9. what the guides document parses ---------------------------------------------------------------------

def test_9_every_lora_targets_value_in_the_guides_parses():
    from jsonargparse import ArgumentParser

    values = set()
    for guide in (ROOT / "howto").glob("*.md"):
        values |= set(re.findall(r"--lora\.targets ('[^']*'|\S+?)`", guide.read_text()))
    assert "all" in values
    parser = ArgumentParser()
    parser.add_function_arguments(script_main("finetune/lora.py"))
    for value in values:
        parsed = parser.instantiate(parser.parse_args(["--lora.targets", value.strip("'")]))
        assert parsed.lora.targets and all(isinstance(t, str) for t in parsed.lora.targets), value


# ---- 10. a finetuned checkpoint's prompt style ---------------------------------------------------------------

def test_10_generate_base_lays_a_finetuned_checkpoints_prompt_out_in_its_style(tiny_run, tmp_path, capsys):
    shutil.copytree(tiny_run / "base", tmp_path / "merged")
    save_json({"prompt_style": "alpaca", "max_seq_length": 128}, tmp_path / "merged" / "training.json")
    main = script_main("generate/base.py")
    real, seen = main.__globals__["encode_prompts"], []

    def recorded(checkpoint_dir, prompts, max_new_tokens):
        seen.extend(prompts)
        return real(checkpoint_dir, prompts, max_new_tokens)

    main.__globals__["encode_prompts"] = recorded
    main(checkpoint_dir=tmp_path / "merged", prompt="Name a color.", temperature=0.0, max_new_tokens=2, dtype="float32",
         device="cpu")
    assert seen and seen[0].startswith("Below is an instruction") and "Name a color." in seen[0]
    assert "prompt style" in capsys.readouterr().err


# ---- 11. --prompts_file answers in file order ---------------------------------------------------------------

def test_11_prompts_file_answers_print_in_file_order(tiny_run, tmp_path, capsys):
    prompts = ["One.", "Two words here and more words to make it long.", "Three three.", "Four four four four.", "Five"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    script_main("generate/base.py")(checkpoint_dir=tiny_run / "base", prompts_file=tmp_path / "prompts.txt",
                                    batch_size=2, temperature=0.0, max_new_tokens=2, dtype="float32", device="cpu")
    headers = [line for line in capsys.readouterr().out.splitlines() if line.startswith("### prompt ")]
    assert headers == [f"### prompt {n}" for n in range(1, 6)]


# ---- 12. the comparison's peak memory and seconds per step ------------------------------------------------------

@pytest.mark.slow
def test_12_each_method_reports_its_own_peak_memory_and_a_median_step_time(tiny_run, tmp_path):
    from lit_lora.evaluation.compare import comparison_rows
    from lit_lora.evaluation.compare import finetune as compare_finetune
    from lit_lora.evaluation.compare import parse_variant
    from lit_lora.speed.training import keep_freed_memory_for_reuse

    keep_freed_memory_for_reuse()  # as after any earlier run in this process: freed memory stays with it
    blocks = [torch.ones(8_000_000) for _ in range(50)]  # 1.6 GB, then freed: an earlier, bigger run
    del blocks
    result = compare_finetune(parse_variant("lora"), tmp_path / "lora", torch.device("cpu"),
                              checkpoint_dir=tiny_run / "base", data_dir=tiny_run / "data", accelerator="cpu",
                              train=train_args(max_steps=4))
    assert result.peak_memory["gb"] < 1.0, result.peak_memory  # a tiny LoRA run, not this process's 1.6 GB
    step_seconds = result.metrics["step_seconds"]
    assert step_seconds["steps"] == 3 and step_seconds["min"] <= step_seconds["median"] <= step_seconds["max"]
    cell = comparison_rows([result])[0]["s / step"]
    assert cell == f"{step_seconds['median']:.3f} ({step_seconds['min']:.3f}-{step_seconds['max']:.3f})"


# ---- 13. confusing messages ------------------------------------------------------------------------------------

def test_13_openai_content_as_a_list_of_text_parts_is_read(tmp_path, llama2_tokenizer_path):
    from lit_lora.workflows.conversations import prepare_conversation_data

    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]},
                          {"role": "assistant", "content": [{"type": "text", "text": "Hello!"}]}]}
    plain = {"messages": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]}
    image = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
                          {"role": "assistant", "content": "A cat."}]}
    (tmp_path / "parts.jsonl").write_text("\n".join(json.dumps(r) for r in (parts, image)) + "\n")
    (tmp_path / "plain.jsonl").write_text(json.dumps(plain) + "\n")
    config = prepare_conversation_data(tmp_path / "parts.jsonl", tmp_path / "a", llama2_tokenizer_path, val_size=0)
    assert config["counts"]["kept"] == 1 and config["counts"]["dropped_malformed"] == 1
    prepare_conversation_data(tmp_path / "plain.jsonl", tmp_path / "b", llama2_tokenizer_path, val_size=0)
    assert (tmp_path / "a" / "train.safetensors").read_bytes() == (tmp_path / "b" / "train.safetensors").read_bytes()


def test_13_a_chat_turn_longer_than_the_context_says_to_shorten_it(tiny_run):
    from lit_lora.tokenizer import Tokenizer
    from lit_lora.workflows.chat import Chat

    chat = Chat(load_checkpoint(tiny_run / "base").eval(), Tokenizer(tiny_run / "base" / "tokenizer.model"),
                max_new_tokens=4)
    chat.respond("Hello")
    with pytest.raises(ValueError, match=r"this message alone takes \d+ of the model's 256 context positions.*: shorten it"):
        chat.respond("word " * 300)


def test_13_a_system_message_with_the_formats_tags_is_refused_at_start(tiny_run, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello\n"))
    line = one_line_error(script_main("generate/chat.py"), ["--checkpoint_dir", tiny_run / "base", "--system",
                          "Be [INST] brief", "--dtype", "float32", "--device", "cpu"], monkeypatch, capsys)
    assert "the system message cannot be used" in line and "tags" in line


def test_13_perplexity_of_a_non_utf8_file_names_it_and_scores_say_where_they_went(tiny_run, tmp_path, monkeypatch,
                                                                                 capsys):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    line = one_line_error(script_main("scripts/evaluate.py"), ["--checkpoint_dir", tiny_run / "base", "--perplexity",
                          tmp_path / "latin1.txt", "--out_dir", tmp_path / "eval", "--dtype", "float32", "--device", "cpu"],
                          monkeypatch, capsys)
    assert "latin1.txt is not UTF-8 text" in line
    (tmp_path / "utf8.txt").write_text("The capital of France is Paris.")
    script_main("scripts/evaluate.py")(checkpoint_dir=tiny_run / "base", perplexity=tmp_path / "utf8.txt",
                                       out_dir=tmp_path / "eval", dtype="float32", device="cpu")
    assert f"wrote {tmp_path / 'eval' / 'scores.json'}" in capsys.readouterr().out


def test_13_resuming_another_runs_checkpoint_says_what_it_is_not_corrupt(tiny_run, tmp_path):
    lora_run(tiny_run, tmp_path / "r2", train=train_args(max_steps=1, save_interval=1))
    checkpoint = tmp_path / "r2" / "checkpoints" / "step-000001.ckpt"
    with pytest.raises(CheckpointError) as error:
        lora_run(tiny_run, tmp_path / "r4", resume=str(checkpoint), lora=LoRAConfig(r=4, alpha=8, dropout=0.0))
    assert "truncated or corrupt" not in str(error.value) and "another method or other settings" in str(error.value)


def test_13_a_json_file_holding_one_object_is_refused_as_documented(tmp_path):
    from lit_lora.workflows.prepare import read_examples

    (tmp_path / "one.json").write_text(json.dumps({"instruction": "Hi", "output": "Hello"}))
    with pytest.raises(ValueError, match="expected a JSON list of records, found a JSON object"):
        read_examples(tmp_path / "one.json")


# ---- 14. skipped tests say why -----------------------------------------------------------------------------------

def test_14_the_test_command_prints_skip_reasons_and_the_readme_says_what_they_need():
    import tomllib

    options = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert "-rs" in options.get("addopts", "").split()
    readme = (ROOT / "README.md").read_text()
    assert "shared/data" in readme and "skip" in readme and "tokenizer.model" in readme
