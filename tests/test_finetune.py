"""The shared training loop through the finetune scripts' code paths, on a tiny model and real Alpaca data."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from lit_lora.files.checkpoint import load_tensors
from lit_lora.model import Config, Llama


ROOT = Path(__file__).resolve().parents[1]


def _script(name: str):
    """Import a script's `main` (scripts are not a package; they are run as files)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name.replace("/", "_")[:-3], ROOT / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _train_args(**overrides):
    from lit_lora.train import TrainArgs

    values = dict(learning_rate=2e-2, global_batch_size=8, micro_batch_size=4, warmup_steps=2, max_steps=10,
                  eval_interval=1000, eval_iters=2, save_interval=1000, seed=7, sample_instruction="Say hi.")
    values.update(overrides)
    return TrainArgs(**values)


def _finetune(method: str, tiny_run: Path, out: str, **kwargs):
    main = _script(f"finetune/{method}.py")
    return main(checkpoint_dir=tiny_run / "base", data_dir=tiny_run / "data", out_dir=tiny_run / out,
                accelerator="cpu", **kwargs)


def _apply(method: str, model):
    """Apply a method through the registry, as lit_lora.methods.finetune does; returns its save function."""
    from lit_lora.adapter import AdapterConfig
    from lit_lora.lora import LoRAConfig
    from lit_lora.methods import get_method, save_weights

    config = LoRAConfig(r=8, alpha=16, dropout=0.05) if method == "lora" else AdapterConfig(prompt_length=10, start_layer=0)
    registered = get_method(method)
    registered.add(model, config)
    registered.mark_trainable(model)
    return lambda path, m: save_weights(path, m, registered, config)


@pytest.mark.parametrize(("method", "learning_rate", "margin"), [("lora", 2e-2, 1.0), ("adapter", 1e-1, 0.3)])
def test_finetuning_lowers_val_loss_and_changes_only_the_adapter(tiny_run, method, learning_rate, margin):
    """The same steps as finetune/lora.py and finetune/adapter.py, holding on to the model to inspect it."""
    from lit_lora.train import RunSettings, fit, start_run

    args = _train_args(learning_rate=learning_rate)
    out = tiny_run / method
    session = start_run(RunSettings(tiny_run / "base", tiny_run / "data", out, args, accelerator="cpu"))
    save_weights = _apply(method, session.model)
    frozen_before = {n: p.detach().clone() for n, p in session.model.named_parameters() if not p.requires_grad}
    trainable_before = {n: p.detach().clone() for n, p in session.model.named_parameters() if p.requires_grad}
    metrics = fit(session.fabric, session.model, session.train_data, session.val_data, args, out,
                  save_weights=save_weights, weights_name="adapter.safetensors")

    history = json.loads((out / "history.json").read_text())["history"]
    initial_val_loss = next(h["val_loss"] for h in history if "val_loss" in h)
    assert history[0]["step"] == 0
    assert metrics["val_loss"] < initial_val_loss - margin, (initial_val_loss, metrics["val_loss"])
    params = dict(session.model.named_parameters())
    assert all(torch.equal(params[n], before) for n, before in frozen_before.items())  # base bit-identical
    assert all(not torch.equal(params[n], before) for n, before in trainable_before.items())  # every adapter tensor moved
    saved = load_tensors(out / "adapter.safetensors")[0]
    assert set(saved) == {n for n in trainable_before}
    assert (out / "loss.png").stat().st_size > 0 and (out / "final_metrics.json").exists()


def test_kill_and_resume_reproduces_the_uninterrupted_run(tiny_run, monkeypatch):
    import lit_lora.train as train_module

    args = dict(train=_train_args(max_steps=6, save_interval=2, learning_rate=3e-3), lora=_lora_config())
    uninterrupted = _finetune("lora", tiny_run, "resume-reference", **args)

    real_lr_at = train_module.lr_at

    def interrupt_in_step_5(step, total_steps, train_args):  # Ctrl-C, twice, in the middle of step 5
        if step == 4:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)  # a second Ctrl-C does not abort the save
        return real_lr_at(step, total_steps, train_args)

    monkeypatch.setattr(train_module, "lr_at", interrupt_in_step_5)
    with pytest.raises(SystemExit) as stopped:
        _finetune("lora", tiny_run, "resume-cut", **args)
    assert stopped.value.code == 128 + signal.SIGINT
    # step 5 was finished and saved (never half-applied), beside the one before it (kept in case it is unreadable)
    assert sorted(p.name for p in (tiny_run / "resume-cut" / "checkpoints").iterdir()) == ["step-000004.ckpt",
                                                                                         "step-000005.ckpt"]
    monkeypatch.setattr(train_module, "lr_at", real_lr_at)
    resumed = _finetune("lora", tiny_run, "resume-cut", resume="auto", **args)

    def train_losses(name):
        history = json.loads((tiny_run / name / "history.json").read_text())["history"]
        return [h["train_loss"] for h in history if "train_loss" in h]

    assert len(train_losses("resume-cut")) == 6
    torch.testing.assert_close(train_losses("resume-cut"), train_losses("resume-reference"), atol=1e-6, rtol=0)
    reference = load_tensors(tiny_run / "resume-reference" / "lit_lora.safetensors")[0]
    continued = load_tensors(tiny_run / "resume-cut" / "lit_lora.safetensors")[0]
    assert all(torch.equal(reference[name], continued[name]) for name in reference)
    assert resumed["steps"] == uninterrupted["steps"] == 6

    with pytest.raises(FileExistsError, match="already holds a finished run"):
        _finetune("lora", tiny_run, "resume-cut", **args)


def _lora_config():
    from lit_lora.lora import LoRAConfig

    return LoRAConfig(r=4, alpha=8, dropout=0.1)


DDP_SCRIPT = """
import sys
from pathlib import Path
from lit_lora.files.checkpoint import save_tensors
from lit_lora.lora import LoRAConfig, add_lora, lora_state_dict, mark_only_lora_as_trainable
from lit_lora.methods import save_weights
from lit_lora.train import RunSettings, TrainArgs, fit, start_run

root, out = Path(sys.argv[1]), Path(sys.argv[2])
args = TrainArgs(learning_rate=3e-3, global_batch_size=8, micro_batch_size=2, warmup_steps=1, max_steps=3,
                 eval_iters=1, seed=3)
session = start_run(RunSettings(root / "base", root / "data", out, args, devices=2, strategy="ddp", accelerator="cpu"))
config = LoRAConfig(r=4, alpha=8, dropout=0.1)
add_lora(session.model, config)
mark_only_lora_as_trainable(session.model)
fit(session.fabric, session.model, session.train_data, session.val_data, args, out,
    save_weights=lambda path, model: save_weights(path, model, "lora", config), weights_name="lit_lora.safetensors")
save_tensors(lora_state_dict(session.model), out / f"rank{session.fabric.global_rank}.safetensors")
"""


@pytest.mark.slow
def test_ddp_on_cpu_with_two_processes(tiny_run, tmp_path):
    script = tmp_path / "ddp_lora.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT))
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, str(script), str(tiny_run), str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = (load_tensors(out / f"rank{r}.safetensors")[0] for r in (0, 1))
    assert set(rank0) == set(rank1) and rank0
    assert all(torch.equal(rank0[name], rank1[name]) for name in rank0)
    initial = {name: t for name, t in rank0.items() if "lora_B" in name}
    assert all(t.abs().sum() > 0 for t in initial.values())  # trained: B left zero


def test_qlora_lowers_val_loss_like_the_16_bit_base(tiny_run):
    """finetune/lora.py --quantize nf4-dq: the same run on a 4-bit base learns about as much."""

    def loss_drop(out: str, **kwargs) -> float:
        metrics = _finetune("lora", tiny_run, out, train=_train_args(), lora=_lora_config(), **kwargs)
        history = json.loads((tiny_run / out / "history.json").read_text())["history"]
        return history[0]["val_loss"] - metrics["val_loss"]

    full_precision, four_bit = loss_drop("qlora-reference"), loss_drop("qlora", quantize="nf4-dq")
    assert full_precision > 1.0
    assert four_bit > 0.8 * full_precision, (full_precision, four_bit)  # within 20 % of the 16-bit run


def test_nan_loss_stops_with_a_clear_message(tiny_run, monkeypatch):
    import lit_lora.train as train_module

    real_loss_fn = train_module.loss_fn
    calls = []

    def nan_from_step_3(logits, labels, compiled=False):  # 2 micro-batches per step: calls 5+ belong to step 3
        calls.append(1)
        loss = real_loss_fn(logits, labels, compiled)
        return loss * float("nan") if len(calls) > 4 + 1 else loss  # +1: the validation before training

    monkeypatch.setattr(train_module, "loss_fn", nan_from_step_3)
    with pytest.raises(FloatingPointError, match=r"loss became nan at step 3; .*Last good checkpoint: .*step-000002.ckpt"):
        _finetune("lora", tiny_run, "nan", train=_train_args(max_steps=5, save_interval=2, eval_iters=1), lora=_lora_config())
    assert not (tiny_run / "nan" / "lit_lora.safetensors").exists()


def test_loss_is_next_token_cross_entropy_over_unmasked_labels():
    from lit_lora.train import loss_fn

    logits, labels = torch.randn(2, 7, 11, requires_grad=True), torch.randint(0, 11, (2, 7))
    labels[0, :3] = -100  # a masked prompt
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(loss_fn(logits, labels), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 7, 50), (3, 45, 1000), (1, 70, 32000)])  # rows not a multiple of the block
def test_loss_fn_matches_cross_entropy(dtype, shape):
    """The blockwise loss against PyTorch's cross entropy on float32 logits: value and gradient."""
    from lit_lora.train import loss_fn

    B, T, V = shape
    torch.manual_seed(0)
    logits = (torch.randn(B, T, V) * 3).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (B, T))
    labels[0, : T // 2] = -100  # a masked prompt
    labels[-1, -3:] = -100  # padding
    ours = loss_fn(logits, labels)
    (grad,) = torch.autograd.grad(ours * 0.5, logits)  # a non-unit upstream gradient (accumulation divides)
    reference = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, V), labels[:, 1:].reshape(-1),
                                                  ignore_index=-100)
    (reference_grad,) = torch.autograd.grad(reference * 0.5, logits)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-6)
    assert grad.dtype == dtype
    torch.testing.assert_close(grad.float(), reference_grad.float(), rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-8)
    assert not grad[0, : T // 2 - 1].any()  # positions whose next token is masked get no gradient
    nothing_counted = loss_fn(logits, torch.full_like(labels, -100))
    assert torch.isnan(nothing_counted)  # like F.cross_entropy: 0 / 0, and, like it, no gradient at all
    assert not torch.autograd.grad(nothing_counted, logits)[0].any()


def test_bf16_true_training_keeps_the_logits_in_bf16(tmp_path):
    """Fabric would cast the model's outputs to float32 (a full copy of the logits); setup_fabric's plugin does not."""
    from lit_lora.speed.training import HalfPrecisionKeepingOutputs
    from lit_lora.train import loss_fn, setup_fabric

    fabric = setup_fabric(tmp_path, "bf16-true", devices=1, num_nodes=1, strategy="auto", accelerator="cpu",
                          activation_checkpointing=False)
    assert isinstance(fabric._precision, HalfPrecisionKeepingOutputs)
    model = fabric.setup_module(Llama(Config.from_name("tiny", vocab_size=100)))
    idx = torch.randint(0, 100, (2, 9))
    logits = model(idx)
    assert logits.dtype == torch.bfloat16
    loss_fn(logits, idx).backward()
    assert all(p.grad.dtype == torch.bfloat16 for p in model.parameters() if p.grad is not None)


def test_packed_finetuning_lowers_the_loss(tiny_run):
    args = dict(train=_train_args(max_steps=6, packing=True, micro_batch_size=2, global_batch_size=4),
                lora=_lora_config())
    metrics = _finetune("lora", tiny_run, "packed", **args)
    history = json.loads((tiny_run / "packed" / "history.json").read_text())["history"]
    val = [h["val_loss"] for h in history if "val_loss" in h]
    assert metrics["finished"] and val[-1] < val[0] - 0.5


def test_compiled_training_matches_eager_and_resumes_exactly(tiny_run, monkeypatch):
    """finetune --compile (inductor's C++ backend on this CPU): the same per-step losses as eager over 20
    steps, with dropout (its masks come from torch's generator in both), and a compiled run killed at
    step 5 resumes to the very losses and weights of an uninterrupted compiled run."""
    import lit_lora.train as train_module

    args = dict(train=_train_args(max_steps=20, learning_rate=3e-3, packing=True, micro_batch_size=2,
                                  global_batch_size=4, eval_iters=1, save_interval=4),
                lora=_lora_config())

    def train_losses(name):
        history = json.loads((tiny_run / name / "history.json").read_text())["history"]
        return [h["train_loss"] for h in history if "train_loss" in h]

    _finetune("lora", tiny_run, "eager-20", **args)
    compiled = _finetune("lora", tiny_run, "compiled-20", compile=True, **args)
    assert len(train_losses("compiled-20")) == 20
    torch.testing.assert_close(train_losses("compiled-20"), train_losses("eager-20"), rtol=1e-4, atol=0)
    assert compiled["first_step_seconds"] > compiled["seconds_per_step"]  # the compiling, reported apart

    real_lr_at = train_module.lr_at

    def interrupt_in_step_6(step, total_steps, train_args):
        if step == 5:
            os.kill(os.getpid(), signal.SIGINT)
        return real_lr_at(step, total_steps, train_args)

    monkeypatch.setattr(train_module, "lr_at", interrupt_in_step_6)
    with pytest.raises(SystemExit):
        _finetune("lora", tiny_run, "compiled-cut", compile=True, **args)
    monkeypatch.setattr(train_module, "lr_at", real_lr_at)
    _finetune("lora", tiny_run, "compiled-cut", compile=True, resume="auto", **args)
    torch.testing.assert_close(train_losses("compiled-cut"), train_losses("compiled-20"), atol=1e-6, rtol=0)
    reference = load_tensors(tiny_run / "compiled-20" / "lit_lora.safetensors")[0]
    continued = load_tensors(tiny_run / "compiled-cut" / "lit_lora.safetensors")[0]
    assert all(torch.equal(reference[name], continued[name]) for name in reference)


@pytest.mark.parametrize("variant", ["adapter", "dora", "qlora", "activation checkpointing", "padded lengths"])
def test_compile_traces_every_method_and_keeps_its_losses(tiny_run, variant, monkeypatch):
    """finetune --compile with LLaMA-Adapter, DoRA, a 4-bit base, activation checkpointing, and padded
    micro-batches of changing lengths: dynamo captures graphs (not an eager fallback) and the losses stay
    the eager ones. The graphs run through AOTAutograd without generating kernels ("aot_eager"), which
    checks the tracing in seconds; the test above runs inductor's kernels."""
    import torch._dynamo.utils

    import lit_lora.speed.training as speed_training
    from lit_lora.adapter import AdapterConfig
    from lit_lora.lora import LoRAConfig

    real_compile = torch.compile
    monkeypatch.setattr(speed_training.torch, "compile", lambda model, **kwargs: real_compile(model, backend="aot_eager"))
    method, extra = "lora", {"lora": LoRAConfig(r=4, alpha=8, dropout=0.1)}
    if variant == "adapter":
        method, extra = "adapter", {"adapter": AdapterConfig(prompt_length=4, start_layer=0)}
    elif variant == "dora":
        extra = {"lora": LoRAConfig(r=4, alpha=8, dropout=0.1, use_dora=True)}
    elif variant == "qlora":
        extra["quantize"] = "nf4"
    train = _train_args(max_steps=3, learning_rate=3e-3, packing=variant != "padded lengths",
                        activation_checkpointing=variant == "activation checkpointing", micro_batch_size=2,
                        global_batch_size=4, eval_iters=1)
    name = variant.replace(" ", "-")
    _finetune(method, tiny_run, f"trace-eager-{name}", train=train, **extra)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    _finetune(method, tiny_run, f"trace-compiled-{name}", train=train, compile=True, **extra)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1

    def train_losses(out):
        history = json.loads((tiny_run / out / "history.json").read_text())["history"]
        return [h["train_loss"] for h in history if "train_loss" in h]

    torch.testing.assert_close(train_losses(f"trace-compiled-{name}"), train_losses(f"trace-eager-{name}"), rtol=1e-4, atol=0)
