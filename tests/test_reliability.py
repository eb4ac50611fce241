"""What goes wrong in real use: diverging runs, two runs in one directory, signals, full disks, corrupt or
hostile files, nonsense settings. Each gets a one-line error or the documented behaviour, loses no
work, and leaves no temporary file behind."""

import json
import os
import shutil
import signal
import sys

import pytest
import torch
from safetensors import SafetensorError

from lit_lora.files.checkpoint import (CheckpointError, MethodFile, atomic_path, load_checkpoint, load_tensors, save_checkpoint,
                                       save_json, save_method_file, save_tensors)
from lit_lora.files.run_dir import lock_out_dir
from lit_lora.lora import LoRAConfig
from lit_lora.methods import finetune, read_weights
from lit_lora.model import Config, Llama
from lit_lora.train import TrainArgs
from lit_lora.workflows.cli import run


def train_args(**overrides):
    values = dict(learning_rate=2e-2, global_batch_size=8, micro_batch_size=4, warmup_steps=1, max_steps=4,
                  eval_interval=1000, eval_iters=1, save_interval=1000, seed=7, sample_instruction="Say hi.")
    return TrainArgs(**{**values, **overrides})


def lora_run(tiny_run, out_dir, **arguments):
    """finetune/lora.py's work, in this process."""
    return finetune("lora", {"checkpoint_dir": tiny_run / "base", "data_dir": tiny_run / "data", "out_dir": out_dir,
                             "accelerator": "cpu", "lora": LoRAConfig(r=2, alpha=4, dropout=0.0),
                             "train": train_args(), **arguments})


def one_line_error(main, argv, monkeypatch, capsys):
    """Run a script's `main` through the command line runner; returns its single stderr line."""
    monkeypatch.setattr(sys, "argv", ["script", *map(str, argv)])
    with pytest.raises(SystemExit) as exited:
        run(main)
    assert exited.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def script_main(path):
    import runpy
    from pathlib import Path

    return runpy.run_path(str(Path(__file__).resolve().parents[1] / path))["main"]


# ---- 1. a diverging run ------------------------------------------------------------------------------

class NaNGradient(torch.autograd.Function):
    """The identity forward; NaN gradients backward: a diverging step whose loss still looks finite."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("nan"))


@pytest.mark.parametrize("grad_clip", [1.0, 0.0], ids=["clipped", "unclipped"])
def test_a_diverging_run_names_a_finite_checkpoint_that_resumes(tiny_run, tmp_path, monkeypatch, grad_clip):
    import lit_lora.train as train_module

    real_loss_fn, calls = train_module.loss_fn, []

    def nan_gradients_from_step_3(logits, labels, compiled=False):  # 2 micro-batches per step, 1 validation batch first
        calls.append(1)
        return real_loss_fn(NaNGradient.apply(logits) if len(calls) > 1 + 4 else logits, labels, compiled)

    monkeypatch.setattr(train_module, "loss_fn", nan_gradients_from_step_3)
    out = tmp_path / "diverged"
    with pytest.raises(FloatingPointError, match=r"the gradients became NaN or infinite at step 3; training stopped. "
                                                 r"Last good checkpoint: .*step-000002\.ckpt"):
        lora_run(tiny_run, out, train=train_args(grad_clip=grad_clip, save_interval=1, max_steps=8))
    monkeypatch.undo()
    assert not (out / "lit_lora.safetensors").exists() and not (out / "final_metrics.json").exists()
    checkpoints = sorted((out / "checkpoints").glob("step-*.ckpt"), reverse=True)
    assert [c.name for c in checkpoints] == ["step-000002.ckpt", "step-000001.ckpt"]
    assert not list((out / "checkpoints").glob("*.tmp"))
    for checkpoint in checkpoints:  # every checkpoint kept has finite weights
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)["model"]
        assert state and all(torch.isfinite(t).all() for t in state.values())
    resumed = lora_run(tiny_run, out, resume="auto", train=train_args(grad_clip=grad_clip, save_interval=1, max_steps=8))
    assert resumed["finished"] and read_weights(out / "lit_lora.safetensors").method.name == "lora"


def test_non_finite_weights_are_never_written_or_loaded(tiny_run, tmp_path, monkeypatch, capsys):
    model = load_checkpoint(tiny_run / "base")
    bad_state = {**model.state_dict(), "norm.weight": torch.full_like(model.norm.weight, float("nan"))}
    with pytest.raises(CheckpointError, match=r"holds NaN or infinite values in norm.weight"):
        save_checkpoint(tmp_path / "nan-model", bad_state, model.config)
    assert not (tmp_path / "nan-model" / "lit_model.safetensors").exists()
    save_tensors(bad_state, tmp_path / "nan-model" / "lit_model.safetensors")  # as a foreign tool might
    save_json(model.config.to_dict(), tmp_path / "nan-model" / "model_config.json")
    with pytest.raises(CheckpointError, match=r"lit_model.safetensors holds NaN or infinite values in norm.weight"):
        load_checkpoint(tmp_path / "nan-model")

    shape = (2, model.config.n_embd)
    tensors = {f"layers.{i}.attn.{p}_proj.lora_{m}": torch.zeros(shape if m == "A" else shape[::-1])
               for i in range(model.config.n_layer) for p in ("q", "v") for m in ("A", "B")}
    tensors["layers.0.attn.q_proj.lora_A"] = torch.full(shape, float("inf"))
    settings = LoRAConfig(r=2, alpha=4).to_dict()
    with pytest.raises(CheckpointError, match="holds NaN or infinite values"):
        save_method_file(tmp_path / "inf.safetensors", MethodFile("lora", settings, model.config, tensors))
    save_tensors(tensors, tmp_path / "inf.safetensors", metadata={
        "method": "lora", "settings": json.dumps(settings), "model_config": json.dumps(model.config.to_dict())})
    line = one_line_error(script_main("scripts/merge_lora.py"), ["--checkpoint_dir", tiny_run / "base", "--lora_path",
                          tmp_path / "inf.safetensors", "--output_dir", tmp_path / "merged"], monkeypatch, capsys)
    assert "inf.safetensors holds NaN or infinite values in layers.0.attn.q_proj.lora_A" in line
    assert not (tmp_path / "merged").exists()


# ---- 2, 3. nobody's work is destroyed ------------------------------------------------------------------

def test_an_unfinished_run_is_never_deleted_without_overwrite(tiny_run, tmp_path):
    out = tmp_path / "unfinished"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "step-000002.ckpt").write_bytes(b"an earlier run's progress")
    with pytest.raises(FileExistsError, match="resumable checkpoints of an unfinished run: continue it with --resume auto"):
        lora_run(tiny_run, out)
    assert (out / "checkpoints" / "step-000002.ckpt").read_bytes() == b"an earlier run's progress"
    assert lora_run(tiny_run, out, overwrite=True)["finished"]  # told to: it starts afresh


def test_a_second_run_into_the_same_out_dir_is_refused(tiny_run, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    held = lock_out_dir(out)  # a run in progress (another process in real life)
    try:
        with pytest.raises(OSError, match=rf"{out} is in use by another run \(process {os.getpid()}\)"):
            lora_run(tiny_run, out)
        assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing written beside the first run's files
    finally:
        held.close()
    assert lora_run(tiny_run, out)["finished"]  # free again once the first run ends


# ---- 4. PEFT import --------------------------------------------------------------------------------

@pytest.mark.parametrize(("change", "expected"), [
    ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa' adapts a modified base"),
    ({"init_lora_weights": "olora"}, "init_lora_weights='olora'"),
    ({"init_lora_weights": "loftq"}, "init_lora_weights='loftq'"),
    ({"alora_invocation_tokens": [1, 2]}, "activated LoRA"),
    ({"lora_alpha": "16"}, "lora_alpha must be a number, got '16'"),
])
def test_peft_adapters_lit_lora_cannot_compute_are_refused(tmp_path, change, expected):
    from lit_lora.lora import lora_state_shapes
    from lit_lora.workflows.peft import load_peft_adapter, save_peft_adapter

    config = Config.from_name("tiny", vocab_size=128)
    lora = LoRAConfig(r=2, alpha=4, targets=("q", "v"))
    shapes = lora_state_shapes(config, lora)
    save_peft_adapter(tmp_path, lora, {name: torch.zeros(shape) for name, shape in shapes.items()})
    adapter_config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert load_peft_adapter(tmp_path, config)[0] == lora  # as written: fine
    save_json({**adapter_config, "lora_dropout": None}, tmp_path / "adapter_config.json")
    assert load_peft_adapter(tmp_path, config)[0].dropout == 0.0  # null dropout is no dropout
    save_json({**adapter_config, **change}, tmp_path / "adapter_config.json")
    with pytest.raises(CheckpointError, match=expected):
        load_peft_adapter(tmp_path, config)
    save_json([adapter_config], tmp_path / "adapter_config.json")
    with pytest.raises(CheckpointError, match="expected a JSON object, found list"):
        load_peft_adapter(tmp_path, config)


# ---- 5, 6. names inside inputs, and prepared data that belongs together ----------------------------------

def test_file_names_inside_inputs_must_stay_inside_their_directory(tiny_run, tmp_path):
    from lit_lora.data import load_prepared_split
    from lit_lora.files.convert import hf_weight_files

    (tmp_path / "hf").mkdir()
    (tmp_path / "secret.safetensors").write_bytes(b"x")
    save_json({"weight_map": {"model.embed_tokens.weight": "../secret.safetensors"}},
              tmp_path / "hf" / "model.safetensors.index.json")
    with pytest.raises(ValueError, match=r"names '\.\./secret.safetensors', which lies outside"):
        hf_weight_files(tmp_path / "hf")
    save_json({"weight_map": {"model.embed_tokens.weight": str(tmp_path / "secret.safetensors")}},
              tmp_path / "hf" / "model.safetensors.index.json")
    with pytest.raises(ValueError, match="which lies outside"):
        hf_weight_files(tmp_path / "hf")

    data = tmp_path / "data"
    shutil.copytree(tiny_run / "data", data)
    config = json.loads((data / "prepare_config.json").read_text())
    save_json({**config, "files": {**config["files"], "train": "/etc/passwd"}}, data / "prepare_config.json")
    with pytest.raises(ValueError, match="prepare_config.json names '/etc/passwd', which lies outside"):
        load_prepared_split(data, "train")


def test_a_prepared_directory_with_files_from_two_preparations_is_refused(tiny_run, tmp_path, shared_data,
                                                                         llama2_tokenizer_path):
    from lit_lora.data import load_prepared_split
    from lit_lora.workflows.prepare import prepare_instruction_data

    data = tmp_path / "data"
    shutil.copytree(tiny_run / "data", data)
    prepare_instruction_data(shared_data / "alpaca" / "alpaca_data_sample.json", tmp_path / "other",
                             llama2_tokenizer_path, max_seq_length=64, val_size=8, seed=42)
    shutil.copy(tmp_path / "other" / "train.safetensors", data / "train.safetensors")  # killed before the config
    with pytest.raises(ValueError, match=r"train.safetensors is not the file .*prepare_config.json was written with"):
        load_prepared_split(data, "train")
    assert load_prepared_split(data, "val")  # the untouched split still loads


# ---- 7, 8. temporary files and full disks -------------------------------------------------------------

def test_temporary_files_of_killed_writers_are_cleaned_up(tmp_path):
    stale = tmp_path / ".weights.safetensors.dead0001.tmp"
    stale.write_bytes(b"half of a file from a killed run")
    save_tensors({"x": torch.ones(2)}, tmp_path / "weights.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights.safetensors"]
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "weights.safetensors") as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("killed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights.safetensors"]
    assert load_tensors(tmp_path / "weights.safetensors")[0]["x"].tolist() == [1.0, 1.0]  # the old file survives


def test_a_full_disk_while_saving_a_checkpoint_leaves_no_temporary_file(tiny_run, tmp_path, monkeypatch):
    import lightning.fabric

    def disk_full(self, path, state, filter=None):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"partial")
        raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")

    monkeypatch.setattr(lightning.fabric.Fabric, "save", disk_full)
    out = tmp_path / "full"
    with pytest.raises(OSError, match=r"could not write .*step-000001.ckpt: PytorchStreamWriter failed .*disk full"):
        lora_run(tiny_run, out, train=train_args(save_interval=1))
    assert not list((out / "checkpoints").glob("*"))
    (out / "checkpoints").mkdir(exist_ok=True)
    (out / "checkpoints" / "step-000001.ckpt.tmp").write_bytes(b"left by a kill")
    monkeypatch.undo()
    assert lora_run(tiny_run, out, overwrite=True)["finished"]  # a stale temporary file is removed at the start
    assert not list((out / "checkpoints").glob("*.tmp"))


def no_space(*args, **kwargs):
    raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                          '"No space left on device" })')


def test_a_full_disk_is_one_line_in_merge_export_and_prepare(tiny_run, tmp_path, monkeypatch, capsys, shared_data,
                                                             llama2_tokenizer_path):
    from lit_lora.lora import add_lora
    from lit_lora.methods import save_weights

    model = load_checkpoint(tiny_run / "base")
    add_lora(model, LoRAConfig(r=2, alpha=4))
    lora_path = save_weights(tmp_path / "lora.safetensors", model, "lora", LoRAConfig(r=2, alpha=4))
    monkeypatch.setattr("lit_lora.files.checkpoint.save_file", no_space)
    line = one_line_error(script_main("scripts/merge_lora.py"), ["--checkpoint_dir", tiny_run / "base", "--lora_path",
                          lora_path, "--output_dir", tmp_path / "merged"], monkeypatch, capsys)
    assert f"could not write {tmp_path / 'merged' / 'lit_model.safetensors'}" in line and "No space left" in line
    assert not (tmp_path / "merged").exists()
    line = one_line_error(script_main("scripts/export_peft.py"), ["--lora_path", lora_path, "--output_dir",
                          tmp_path / "peft"], monkeypatch, capsys)
    assert "could not write" in line and not (tmp_path / "peft").exists()
    line = one_line_error(script_main("scripts/prepare_alpaca.py"), [
        "--data_file", shared_data / "alpaca" / "alpaca_data_sample.json", "--tokenizer_path", llama2_tokenizer_path,
        "--destination_path", tmp_path / "prepared"], monkeypatch, capsys)
    assert "could not write" in line and not (tmp_path / "prepared").exists()


# ---- 9. a corrupt resumable checkpoint ------------------------------------------------------------------

def test_resume_auto_falls_back_to_the_checkpoint_before_a_corrupt_one(tiny_run, tmp_path, capsys):
    out = tmp_path / "corrupt"
    with pytest.raises(SystemExit):
        _interrupted(tiny_run, out, at_step=3)  # checkpoints after steps 2 and 3
    newest, previous = sorted((out / "checkpoints").glob("step-*.ckpt"), reverse=True)
    newest.write_bytes(newest.read_bytes()[:200])  # truncated
    with pytest.raises(CheckpointError, match=rf"{newest} is not a readable checkpoint \(truncated or corrupt\?\)"):
        lora_run(tiny_run, out, resume=str(newest), train=train_args(max_steps=6, save_interval=1))
    capsys.readouterr()
    assert lora_run(tiny_run, out, resume="auto", train=train_args(max_steps=6, save_interval=1))["finished"]
    output = capsys.readouterr().out
    assert f"falling back to {previous}" in output and f"resumed from {previous}" in output


def _interrupted(tiny_run, out, at_step=3, signum=signal.SIGTERM, **arguments):
    """A run that receives `signum` during step `at_step` (as a scheduler's SIGTERM would arrive)."""
    import lit_lora.train as train_module

    real_lr_at = train_module.lr_at

    def lr_with_signal(step, total_steps, args):
        if step == at_step - 1:
            os.kill(os.getpid(), signum)
        return real_lr_at(step, total_steps, args)

    train_module.lr_at = lr_with_signal
    try:
        lora_run(tiny_run, out, train=train_args(max_steps=6, save_interval=1), **arguments)
    finally:
        train_module.lr_at = real_lr_at


def test_sigterm_saves_a_resumable_checkpoint(tiny_run, tmp_path, capsys):
    out = tmp_path / "preempted"
    with pytest.raises(SystemExit) as stopped:
        _interrupted(tiny_run, out, at_step=2)
    assert stopped.value.code == 128 + signal.SIGTERM
    assert "SIGTERM: saved a resumable checkpoint" in capsys.readouterr().out
    assert (out / "checkpoints" / "step-000002.ckpt").is_file()
    assert lora_run(tiny_run, out, resume="auto", train=train_args(max_steps=6, save_interval=1))["steps"] == 6


# ---- 10, 13. data and settings that make no sense ---------------------------------------------------------

def test_token_ids_outside_the_vocabulary_are_refused_on_load(tiny_run, tmp_path):
    from lit_lora.data import load_prepared_split

    assert load_prepared_split(tiny_run / "data", "train", vocab_size=32000)
    with pytest.raises(ValueError, match=r"train.safetensors holds token id \d+, outside the model's vocabulary of 1000"):
        load_prepared_split(tiny_run / "data", "train", vocab_size=1000)


@pytest.mark.parametrize(("settings", "expected"), [
    ({"micro_batch_size": 0}, "train.micro_batch_size must be an integer >= 1, got 0"),
    ({"global_batch_size": 0}, "train.global_batch_size must be an integer >= 1"),
    ({"eval_interval": 0}, "train.eval_interval must be an integer >= 1"),
    ({"save_interval": 0}, "train.save_interval"),
    ({"log_interval": 0}, "train.log_interval"),
    ({"eval_iters": 0}, "train.eval_iters"),
    ({"max_steps": -5}, "train.max_steps must be a positive integer"),
    ({"max_steps": 0}, "train.max_steps must be a positive integer"),
    ({"epochs": 0}, "train.epochs must be an integer >= 1"),
    ({"learning_rate": float("nan")}, "train.learning_rate must be a finite number"),
])
def test_nonsense_training_settings_are_refused(settings, expected):
    with pytest.raises(ValueError, match=expected):
        TrainArgs(**settings)


def test_nonsense_training_settings_are_one_line_on_the_command_line(monkeypatch, capsys, tmp_path):
    line = one_line_error(script_main("finetune/lora.py"), ["--train.micro_batch_size", "0", "--out_dir", tmp_path],
                          monkeypatch, capsys)
    assert "micro_batch_size must be an integer >= 1, got 0" in line


def test_without_validation_data_the_metrics_stay_valid_json(tiny_run, tmp_path, shared_data, llama2_tokenizer_path):
    from lit_lora.workflows.prepare import prepare_instruction_data

    prepare_instruction_data(shared_data / "alpaca" / "alpaca_data_sample.json", tmp_path / "data",
                             llama2_tokenizer_path, max_seq_length=128, val_size=0, seed=42)
    metrics = finetune("lora", {"checkpoint_dir": tiny_run / "base", "data_dir": tmp_path / "data",
                                "out_dir": tmp_path / "out", "accelerator": "cpu", "train": train_args()})
    assert metrics["finished"] and "val_loss" not in metrics
    text = (tmp_path / "out" / "final_metrics.json").read_text()
    assert "NaN" not in text and json.loads(text)["steps"] == 4


def test_resuming_with_another_batch_size_says_so(tiny_run, tmp_path, capsys):
    out = tmp_path / "rebatched"
    with pytest.raises(SystemExit):
        _interrupted(tiny_run, out, at_step=2)
    capsys.readouterr()
    lora_run(tiny_run, out, resume="auto", train=train_args(max_steps=6, micro_batch_size=2))
    assert "differ from the checkpoint's" in capsys.readouterr().out


# ---- 11, 14. one line, not a traceback ----------------------------------------------------------------------

def test_malformed_configs_and_inputs_are_one_line_errors(tmp_path):
    from lit_lora.files.hf_names import config_from_hf
    from lit_lora.generate import check_generation_settings
    from lit_lora.workflows.inference import choose_device

    with pytest.raises(ValueError, match="Config.n_head must be a positive integer, got 0"):
        Config(n_head=0)
    with pytest.raises(ValueError, match="n_head must be a positive integer"):
        config_from_hf({"hidden_size": 64, "num_attention_heads": 0, "num_hidden_layers": 2, "vocab_size": 100,
                        "intermediate_size": 128})
    with pytest.raises(ValueError, match=r"temperature must be 0 \(greedy\) or between 1e-05 and infinity, got 1e-45"):
        check_generation_settings(10, 1e-45, None, None)
    with pytest.raises(ValueError, match="--device 'gpu0' is not a device"):
        choose_device("gpu0")

    config = Config.from_name("tiny", vocab_size=64)
    model = Llama(config)
    state = {name: t.clone() for name, t in model.state_dict().items()}
    state["norm.weight"] = state["norm.weight"].to(torch.int32)
    save_tensors(state, tmp_path / "int" / "lit_model.safetensors")
    save_json(config.to_dict(), tmp_path / "int" / "model_config.json")
    with pytest.raises(CheckpointError, match="norm.weight has dtype torch.int32, expected a floating-point tensor"):
        load_checkpoint(tmp_path / "int")

    bad_header = {**config.to_dict(), "n_head": 0}
    save_tensors({"x": torch.zeros(1)}, tmp_path / "bad.safetensors", metadata={
        "method": "lora", "settings": "{}", "model_config": json.dumps(bad_header)})
    with pytest.raises(CheckpointError, match="unreadable adapter header .*n_head must be a positive integer"):
        read_weights(tmp_path / "bad.safetensors")


@pytest.mark.parametrize(("text", "expected"), [
    ("[]", "no usable record among 0"),
    ("[" * 50000 + "]" * 50000, "nested too deeply"),
    ('{\n  "instruction": "a",\n  "output": "b"\n}\n', "expected a JSON list of records, found a JSON object"),
])
def test_unusable_data_files_are_one_line_errors(tmp_path, llama2_tokenizer_path, text, expected):
    from lit_lora.workflows.prepare import prepare_instruction_data

    (tmp_path / "data.json").write_text(text)
    with pytest.raises(ValueError, match=expected):
        prepare_instruction_data(tmp_path / "data.json", tmp_path / "out", llama2_tokenizer_path)


def test_a_record_with_a_lone_surrogate_is_skipped_not_fatal(tmp_path, llama2_tokenizer_path):
    from lit_lora.workflows.prepare import prepare_instruction_data

    records = [{"instruction": f"Say {i}.", "output": f"{i}"} for i in range(6)]
    text = json.dumps(records)[:-1] + ', {"instruction": "broken \\ud800", "output": "x"}]'
    (tmp_path / "data.json").write_text(text)
    config = prepare_instruction_data(tmp_path / "data.json", tmp_path / "out", llama2_tokenizer_path, val_size=1)
    assert config["counts"]["dropped_malformed"] == 1 and config["counts"]["kept"] == 6
    assert "lone UTF-16 surrogate" in config["skipped"][0]


def test_a_legacy_format_bin_checkpoint_converts(tmp_path, hf_llama_factory):
    from lit_lora.files.convert import convert_hf_checkpoint

    hf = hf_llama_factory(n_layer=2)
    hf.config.save_pretrained(tmp_path / "hf")
    torch.save(hf.state_dict(), tmp_path / "hf" / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    converted = load_checkpoint(convert_hf_checkpoint(tmp_path / "hf", tmp_path / "lit"))
    idx = torch.randint(0, 256, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(converted(idx), hf(idx).logits, atol=1e-4, rtol=0)


def test_overwrite_removes_the_old_finished_run_before_training(tiny_run, tmp_path):
    out = tmp_path / "replaced"
    assert lora_run(tiny_run, out)["finished"]
    with pytest.raises(SystemExit):  # the new run is stopped before it finishes ...
        _interrupted(tiny_run, out, at_step=2, overwrite=True)
    # ... and nothing of the old run is left to look finished
    assert not (out / "final_metrics.json").exists() and not (out / "lit_lora.safetensors").exists()


def test_a_third_signal_stops_a_step_that_never_finishes():
    from lit_lora.files.run_dir import deferred_signals

    with pytest.raises(KeyboardInterrupt):
        with deferred_signals() as received:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGTERM)
            assert received == [signal.SIGINT, signal.SIGTERM]  # recorded, not obeyed
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored


def test_outputs_of_other_commands_are_not_replaced_without_overwrite(tiny_run, tmp_path, monkeypatch, capsys):
    from lit_lora.lora import add_lora
    from lit_lora.methods import save_weights

    model = load_checkpoint(tiny_run / "base")
    add_lora(model, LoRAConfig(r=2, alpha=4))
    lora_path = save_weights(tmp_path / "lora.safetensors", model, "lora", LoRAConfig(r=2, alpha=4))
    merge = script_main("scripts/merge_lora.py")
    merge(checkpoint_dir=tiny_run / "base", lora_path=lora_path, output_dir=tmp_path / "merged")
    line = one_line_error(merge, ["--checkpoint_dir", tiny_run / "base", "--lora_path", lora_path,
                                  "--output_dir", tmp_path / "merged"], monkeypatch, capsys)
    assert "lit_model.safetensors already exists: pass --overwrite true" in line
    merge(checkpoint_dir=tiny_run / "base", lora_path=lora_path, output_dir=tmp_path / "merged", overwrite=True)


def test_names_inside_inputs_may_be_symbolic_links_within_the_directory(tmp_path):
    from lit_lora.files.utils import inside

    (tmp_path / "blobs").mkdir()
    (tmp_path / "blobs" / "abc").write_bytes(b"x")
    (tmp_path / "snapshot").mkdir()
    (tmp_path / "snapshot" / "model.safetensors").symlink_to(tmp_path / "blobs" / "abc")  # a Hugging Face cache
    assert inside(tmp_path / "snapshot", "model.safetensors", "index").read_bytes() == b"x"
    assert inside(tmp_path / "snapshot", "shards/model-1.safetensors", "index") == tmp_path / "snapshot" / "shards" / "model-1.safetensors"


def test_evaluation_without_the_harness_says_how_to_install_it(tiny_run, monkeypatch):
    from lit_lora.evaluation.evaluate import run_tasks

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if not installed
    with pytest.raises(ValueError, match=r'lm-eval is not installed: pip install -e "\.\[eval\]"'):
        run_tasks(load_checkpoint(tiny_run / "base"), None, ["hellaswag"])


def test_validation_with_nothing_to_count_reports_nothing_not_a_divergence(tmp_path):
    from lit_lora.train import setup_fabric, validate

    model = Llama(Config.from_name("tiny", vocab_size=64))
    ids = torch.randint(0, 64, (6,))
    samples = [{"input_ids": ids, "labels": torch.full_like(ids, -100)}]  # every label masked
    assert validate(setup_fabric(tmp_path, "32-true", accelerator="cpu"), model, samples, train_args()) is None
