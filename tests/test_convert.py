"""Weight conversion: Hugging Face and Meta checkpoints to lit-lora and back, checked against transformers."""

import json
import math
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_hf_llama
from safetensors import safe_open
from safetensors.torch import load_file

from lit_lora.files.checkpoint import CheckpointError, load_checkpoint
from lit_lora.files.convert import (convert_hf_checkpoint, convert_lit_checkpoint, convert_meta_checkpoint,
                                    meta_intermediate_size, meta_to_rotate_half, save_tensors_streaming)
from lit_lora.model import apply_rope, rope_cos_sin


SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
TOKENIZER_BYTES = b"not a real sentencepiece model, only copied along"


def save_hf(model, directory: Path, weights: str = "safetensors", shards: bool = False) -> Path:
    """Save a transformers model as single or sharded safetensors, or sharded pytorch_model-*.bin files
    (written by hand: transformers 5 only writes safetensors), the way the Hub distributes them. The
    .bin files carry the rotary `inv_freq` buffers that transformers 4.30 and older saved."""
    model.save_pretrained(directory, max_shard_size="200KB" if shards else "10GB")
    if weights == "bin":
        index = json.loads((directory / "model.safetensors.index.json").read_text())
        renamed = {}
        for name in dict.fromkeys(index["weight_map"].values()):
            bin_name = name.replace("model-", "pytorch_model-").replace(".safetensors", ".bin")
            state = load_file(directory / name)
            state.update({f"model.layers.{i}.self_attn.rotary_emb.inv_freq": torch.ones(8)
                          for i in range(model.config.num_hidden_layers) if f"model.layers.{i}.mlp.up_proj.weight" in state})
            torch.save(state, directory / bin_name)
            (directory / name).unlink()
            renamed[name] = bin_name
        index["weight_map"] = {key: renamed[name] for key, name in index["weight_map"].items()}
        (directory / "pytorch_model.bin.index.json").write_text(json.dumps(index))
        (directory / "model.safetensors.index.json").unlink()
    (directory / "tokenizer.model").write_bytes(TOKENIZER_BYTES)
    return directory


def assert_same_logits(ours, hf_model, vocab_size: int) -> None:
    idx = torch.randint(0, vocab_size, (2, 23))
    with torch.no_grad():
        expected = hf_model(idx).logits
        actual = ours(idx)
    assert expected.abs().max() > 1.0  # not a comparison of near-zero logits
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=0)


# --------------------------------------------------------------------------------- Hugging Face -> lit


@pytest.mark.parametrize(("n_kv_heads", "weights", "shards"), [
    (4, "safetensors", False),
    (2, "safetensors", True),
    (2, "bin", True),
], ids=["MHA-safetensors", "GQA-safetensors-sharded", "GQA-bin-sharded"])
def test_hf_checkpoint_converts_to_same_logits(tmp_path, n_kv_heads, weights, shards):
    hf = make_hf_llama(n_kv_heads=n_kv_heads)
    source = save_hf(hf, tmp_path / "hf", weights, shards)
    if shards:
        assert len(list(source.glob("*.bin" if weights == "bin" else "*.safetensors"))) > 1
    output = convert_hf_checkpoint(source, tmp_path / "lit")
    assert (output / "tokenizer.model").read_bytes() == TOKENIZER_BYTES
    assert_same_logits(load_checkpoint(output).eval(), hf, hf.config.vocab_size)


def test_hf_conversion_in_place_with_tied_embeddings_and_dtype_cast(tmp_path):
    hf = make_hf_llama(tie=True)
    source = save_hf(hf, tmp_path / "hf")
    convert_hf_checkpoint(source, dtype=torch.bfloat16)  # default output: beside the Hugging Face files
    model = load_checkpoint(source)
    assert model.config.tie_embeddings and model.lm_head.weight is model.tok_embeddings.weight
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    expected = hf.model.layers[1].self_attn.k_proj.weight.to(torch.bfloat16)
    assert torch.equal(model.layers[1].attn.k_proj.weight, expected)
    with torch.no_grad():  # the reference: the same bf16-rounded weights, computed in float32
        for param in hf.parameters():
            param.copy_(param.to(torch.bfloat16))
    assert_same_logits(load_checkpoint(source, dtype=torch.float32).eval(), hf, hf.config.vocab_size)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_hf_to_lit_to_hf_is_bit_exact(tmp_path, tie):
    from transformers import LlamaForCausalLM

    hf = make_hf_llama(n_kv_heads=2, tie=tie).to(torch.bfloat16)
    source = save_hf(hf, tmp_path / "hf", shards=True)
    original = {}
    for shard in source.glob("*.safetensors"):
        original.update(load_file(shard))

    exported = convert_lit_checkpoint(convert_hf_checkpoint(source, tmp_path / "lit"), tmp_path / "hf-again")
    round_trip = load_file(exported / "model.safetensors")
    assert sorted(round_trip) == sorted(original)
    for name, tensor in original.items():
        assert round_trip[name].dtype == tensor.dtype and torch.equal(round_trip[name], tensor), name
    assert (exported / "tokenizer.model").read_bytes() == TOKENIZER_BYTES

    assert LlamaForCausalLM.from_pretrained(exported).dtype == torch.bfloat16  # config.json records the dtype
    reloaded = LlamaForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
    reference = LlamaForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    idx = torch.randint(0, hf.config.vocab_size, (2, 23))
    with torch.no_grad():
        assert torch.equal(reloaded(idx).logits, reference(idx).logits)


# -------------------------------------------------------------------------------------- Meta -> lit


def test_meta_mlp_size_reproduces_published_llama2_sizes():
    assert meta_intermediate_size(4096, 256) == 11008  # 7B
    assert meta_intermediate_size(5120, 256) == 13824  # 13B
    assert meta_intermediate_size(8192, 4096, 1.3) == 28672  # 70B


def test_meta_rotary_layout_becomes_rotate_half():
    """Meta's RoPE (neighbouring features as complex numbers, as in Meta's apply_rotary_emb) applied to
    q_meta, then permuted, equals our rotate-half RoPE applied to the permuted q."""
    hs, T = 16, 7
    q_meta = torch.randn(T, hs)
    angles = torch.arange(T)[:, None].float() / 10000.0 ** (torch.arange(0, hs, 2).float() / hs)  # (T, hs/2)
    rotated = torch.view_as_real(torch.view_as_complex(q_meta.view(T, hs // 2, 2)) * torch.polar(torch.ones_like(angles), angles))
    meta_result = rotated.reshape(T, hs)  # (T, hs), Meta's layout

    to_ours = meta_to_rotate_half(torch.eye(hs), n_heads=1)  # permutation matrix: ours = P @ meta
    cos, sin = rope_cos_sin(torch.arange(T), hs, 10000.0, torch.float32)
    ours = apply_rope((q_meta @ to_ours.T)[None, None], cos, sin)[0, 0]
    torch.testing.assert_close(ours, meta_result @ to_ours.T)


def make_meta_checkpoint(directory: Path, n_layers=2, dim=64, n_heads=4, n_kv_heads=2, vocab=96, ranks=2):
    """Random Llama 2 weights in Meta's format: params.json and `ranks` tensor-parallel shards, plus the
    tokenizer one level up (where Meta's download script puts it). Returns (params, full weights)."""
    params = {"dim": dim, "n_layers": n_layers, "n_heads": n_heads, "n_kv_heads": n_kv_heads, "multiple_of": 32,
              "ffn_dim_multiplier": 1.3, "norm_eps": 1e-5, "vocab_size": -1}
    hidden, hs = 224, dim // n_heads  # 2/3 * 4 * 64 = 170, * 1.3 = 221, rounded up to a multiple of 32
    shapes = {"tok_embeddings.weight": (vocab, dim), "norm.weight": (dim,), "output.weight": (vocab, dim)}
    for i in range(n_layers):
        shapes.update({
            f"layers.{i}.attention_norm.weight": (dim,), f"layers.{i}.ffn_norm.weight": (dim,),
            f"layers.{i}.attention.wq.weight": (n_heads * hs, dim), f"layers.{i}.attention.wk.weight": (n_kv_heads * hs, dim),
            f"layers.{i}.attention.wv.weight": (n_kv_heads * hs, dim), f"layers.{i}.attention.wo.weight": (dim, n_heads * hs),
            f"layers.{i}.feed_forward.w1.weight": (hidden, dim), f"layers.{i}.feed_forward.w2.weight": (dim, hidden),
            f"layers.{i}.feed_forward.w3.weight": (hidden, dim),
        })
    torch.manual_seed(0)
    full = {name: torch.empty(shape).uniform_(0.5, 1.5) if len(shape) == 1 else torch.randn(shape) / math.sqrt(shape[-1])
            for name, shape in shapes.items()}
    # Which dim Meta's model-parallel layers split: written out here independently of lit_lora.files.convert.
    row_parallel = ("attention.wo", "feed_forward.w2", "tok_embeddings")
    shards = [{"rope.freqs": torch.zeros(hs // 2)} for _ in range(ranks)]
    for name, tensor in full.items():
        if tensor.dim() == 1:
            pieces = [tensor.clone()] * ranks
        else:
            pieces = tensor.chunk(ranks, dim=1 if any(part in name for part in row_parallel) else 0)
        for shard, piece in zip(shards, pieces):
            shard[name] = piece.clone()
    directory.mkdir(parents=True)
    for rank, shard in enumerate(shards):
        torch.save(shard, directory / f"consolidated.{rank:02d}.pth")
    (directory / "params.json").write_text(json.dumps(params))
    (directory.parent / "tokenizer.model").write_bytes(TOKENIZER_BYTES)
    return params, full


def hf_reference_from_meta(params, full):
    """A transformers Llama holding Meta's weights, un-permuted by index gathering: in each q/k head,
    Meta's even rows become the first half and its odd rows the second (rotate-half pairs i, i + hs/2)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    dim, n_heads, n_kv = params["dim"], params["n_heads"], params["n_kv_heads"]
    hs = dim // n_heads
    rows = torch.cat([torch.arange(0, hs, 2), torch.arange(1, hs, 2)])

    def unpermute(w, heads):
        return w.view(heads, hs, dim)[:, rows].reshape(heads * hs, dim)

    config = LlamaConfig(vocab_size=full["tok_embeddings.weight"].shape[0], hidden_size=dim, intermediate_size=224,
                         num_hidden_layers=params["n_layers"], num_attention_heads=n_heads, num_key_value_heads=n_kv,
                         max_position_embeddings=128, rms_norm_eps=params["norm_eps"], tie_word_embeddings=False)
    state = {"model.embed_tokens.weight": full["tok_embeddings.weight"], "model.norm.weight": full["norm.weight"],
             "lm_head.weight": full["output.weight"]}
    for i in range(params["n_layers"]):
        m, h = f"layers.{i}.", f"model.layers.{i}."
        state.update({
            h + "input_layernorm.weight": full[m + "attention_norm.weight"],
            h + "post_attention_layernorm.weight": full[m + "ffn_norm.weight"],
            h + "self_attn.q_proj.weight": unpermute(full[m + "attention.wq.weight"], n_heads),
            h + "self_attn.k_proj.weight": unpermute(full[m + "attention.wk.weight"], n_kv),
            h + "self_attn.v_proj.weight": full[m + "attention.wv.weight"],
            h + "self_attn.o_proj.weight": full[m + "attention.wo.weight"],
            h + "mlp.gate_proj.weight": full[m + "feed_forward.w1.weight"],
            h + "mlp.down_proj.weight": full[m + "feed_forward.w2.weight"],
            h + "mlp.up_proj.weight": full[m + "feed_forward.w3.weight"],
        })
    model = LlamaForCausalLM(config).eval()
    model.load_state_dict(state, strict=True)
    return model


def test_meta_checkpoint_in_two_shards_converts_to_same_logits(tmp_path):
    source = tmp_path / "llama-2-tiny"
    params, full = make_meta_checkpoint(source)
    # The reference merges nothing from the shard files: it uses the full tensors the shards were cut from.
    reference = hf_reference_from_meta(params, full)

    output = convert_meta_checkpoint(source, tmp_path / "lit")
    model = load_checkpoint(output).eval()
    assert (model.config.vocab_size, model.config.n_kv_heads, model.config.intermediate_size) == (96, 2, 224)
    assert (output / "tokenizer.model").read_bytes() == TOKENIZER_BYTES
    assert_same_logits(model, reference, 96)


# ------------------------------------------------------------------------------------ broken inputs


def test_truncated_safetensors_is_a_one_line_error_and_leaves_no_output(tmp_path):
    source = save_hf(make_hf_llama(), tmp_path / "hf")
    weights = source / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors is unreadable") as error:
        convert_hf_checkpoint(source, tmp_path / "out" / "lit")
    assert "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()


def test_corrupt_bin_shard_is_a_one_line_error(tmp_path):
    source = save_hf(make_hf_llama(), tmp_path / "hf", weights="bin", shards=True)
    (source / "pytorch_model-00002-of-00004.bin").write_bytes(b"\x00garbage" * 100)
    with pytest.raises(CheckpointError, match=r"pytorch_model-00002-of-00004.bin is unreadable"):
        convert_hf_checkpoint(source, tmp_path / "lit")
    (source / "pytorch_model-00002-of-00004.bin").unlink()
    with pytest.raises(CheckpointError, match=r"index.json lists pytorch_model-00002-of-00004.bin, which is missing"):
        convert_hf_checkpoint(source, tmp_path / "lit")
    assert not (tmp_path / "lit").exists()


class RunsCode:
    def __reduce__(self):
        return (exec, ("raise SystemExit('unpickling ran code')",))


def test_bin_with_python_objects_is_refused_without_running_them(tmp_path):
    source = save_hf(make_hf_llama(), tmp_path / "hf")
    (source / "model.safetensors").unlink()
    torch.save({"model.norm.weight": torch.ones(64), "payload": RunsCode()}, source / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model.bin holds Python objects besides tensors"):
        convert_hf_checkpoint(source, tmp_path / "lit")


def test_shapes_that_disagree_with_config_json_are_named(tmp_path):
    source = save_hf(make_hf_llama(), tmp_path / "hf")
    config = json.loads((source / "config.json").read_text())
    config["intermediate_size"] += 8
    (source / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"model.safetensors does not match the model: wrong shapes: "
                                              r"layers.0.mlp.down_proj.weight \(64, 140\) != expected \(64, 148\).*config.json"):
        convert_hf_checkpoint(source, tmp_path / "lit")
    assert not (tmp_path / "lit").exists()


def test_missing_config_json_through_the_script(tmp_path):
    source = save_hf(make_hf_llama(), tmp_path / "hf")
    (source / "config.json").unlink()
    result = subprocess.run([sys.executable, str(SCRIPTS / "convert_hf_checkpoint.py"), "--checkpoint_dir", str(source),
                             "--output_dir", str(tmp_path / "lit")], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert f"{source / 'config.json'} not found" in result.stderr
    assert not (tmp_path / "lit").exists()


def test_meta_checkpoint_errors(tmp_path):
    source = tmp_path / "llama-2-tiny"
    make_meta_checkpoint(source)
    (source / "params.json").rename(tmp_path / "params.json")
    with pytest.raises(CheckpointError, match=r"params.json not found"):
        convert_meta_checkpoint(source, tmp_path / "lit")
    params = json.loads((tmp_path / "params.json").read_text())
    (source / "params.json").write_text(json.dumps({**params, "n_kv_heads": 4}))  # k/v shards hold 2 heads
    with pytest.raises(CheckpointError, match=r"the 2 shards in .*llama-2-tiny does not match the model: "
                                              r"wrong shapes: layers.0.attn.k_proj.weight \(32, 64\) != expected \(64, 64\)"):
        convert_meta_checkpoint(source, tmp_path / "lit")
    assert not (tmp_path / "lit").exists()


def test_failure_while_writing_removes_only_what_the_run_created(tmp_path, monkeypatch):
    import lit_lora.files.convert as convert

    source = save_hf(make_hf_llama(), tmp_path / "hf")

    def broken_reader(path):
        raise CheckpointError(f"{path}: could not read tensor (simulated)")
    monkeypatch.setattr(convert, "_open_tensors", broken_reader)
    with pytest.raises(CheckpointError, match="simulated"):
        convert_hf_checkpoint(source, tmp_path / "new" / "nested" / "lit")
    assert not (tmp_path / "new").exists()

    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="simulated"):
        convert_hf_checkpoint(source, existing)
    assert sorted(p.name for p in existing.iterdir()) == ["notes.txt"]  # no temporary or partial file


def test_export_refuses_to_overwrite_its_source(tmp_path):
    source = save_hf(make_hf_llama(), tmp_path / "hf")
    convert_hf_checkpoint(source)
    with pytest.raises(ValueError, match="must differ"):
        convert_lit_checkpoint(source, source)


def test_streaming_writer_output_is_read_by_safetensors(tmp_path):
    tensors = {"b": torch.randn(3, 5, dtype=torch.bfloat16), "a": torch.randn(7), "c": torch.randn(2, 2).half()}
    layout = {name: (tuple(t.shape), t.dtype) for name, t in tensors.items()}
    save_tensors_streaming(tmp_path / "x.safetensors", layout, iter(tensors.items()), metadata={"format": "pt"})
    with safe_open(str(tmp_path / "x.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        for name, tensor in tensors.items():
            assert torch.equal(f.get_tensor(name), tensor)
    with pytest.raises(RuntimeError, match="ended before the plan"):
        save_tensors_streaming(tmp_path / "y.safetensors", layout, iter(list(tensors.items())[:2]))
    assert not (tmp_path / "y.safetensors").exists()


# ----------------------------------------------------------------------------------------- download


@pytest.fixture(scope="module")
def download_script():
    return runpy.run_path(str(SCRIPTS / "download.py"))


def test_download_prefers_safetensors_and_fetches_config_and_tokenizer(download_script):
    choose = download_script["choose_files"]
    both = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json",
            "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin", "pytorch_model.bin.index.json",
            "config.json", "tokenizer.model", "README.md", "original/consolidated.00.pth", "LICENSE.txt"]
    files, converter = choose("meta-llama/Llama-2-7b-hf", both)
    assert sorted(files) == ["config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                             "model.safetensors.index.json", "tokenizer.model"]
    assert converter == "convert_hf_checkpoint.py"
    files, _ = choose("x/y", ["pytorch_model.bin", "config.json", "tokenizer.json"])
    assert sorted(files) == ["config.json", "pytorch_model.bin", "tokenizer.json"]
    files, converter = choose("meta-llama/Llama-2-13b", ["consolidated.00.pth", "consolidated.01.pth", "params.json",
                                                        "tokenizer.model", "checklist.chk"])
    assert sorted(files) == ["consolidated.00.pth", "consolidated.01.pth", "params.json", "tokenizer.model"]
    assert converter == "convert_meta_checkpoint.py"
    with pytest.raises(ValueError, match="holds no Llama weights"):
        choose("karpathy/tinyllamas", ["stories15M.bin", "stories15M.pt", "README.md"])


def test_download_calls_the_hub_with_the_chosen_files(download_script, tmp_path, monkeypatch):
    import huggingface_hub

    calls = {}
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo_id, token=None: ["model.safetensors", "config.json",
                                                                                         "tokenizer.model", "README.md"])
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kwargs: calls.update(kwargs, repo_id=repo_id))
    local_dir = download_script["main"]("TinyLlama/TinyLlama-1.1B-Chat-v1.0", access_token="hf_x", checkpoint_dir=tmp_path)
    assert local_dir == tmp_path / "TinyLlama" / "TinyLlama-1.1B-Chat-v1.0"
    assert calls == {"repo_id": "TinyLlama/TinyLlama-1.1B-Chat-v1.0", "local_dir": local_dir, "token": "hf_x",
                     "allow_patterns": ["model.safetensors", "config.json", "tokenizer.model"]}


@pytest.mark.parametrize(("error", "token", "expected"), [
    ("GatedRepoError", None, "is gated: accept the license at https://huggingface.co/meta-llama/Llama-2-7b-hf, "),
    ("GatedRepoError", "hf_x", "your token has no access yet"),
    ("RepositoryNotFoundError", None, "was not found on the Hugging Face Hub"),
    ("LocalEntryNotFoundError", None, "could not reach huggingface.co"),
    ("ConnectionError", None, "(ConnectionError: [Errno -2] Name or service not known): check your internet connection"),
])
def test_download_failures_are_one_line_errors(download_script, monkeypatch, capsys, error, token, expected):
    from unittest.mock import MagicMock

    import huggingface_hub
    import huggingface_hub.utils as hub_errors

    message = "403 Client Error.\nCannot access gated repo for url https://huggingface.co/api/models/x."
    if error in ("GatedRepoError", "RepositoryNotFoundError"):
        raised = getattr(hub_errors, error)(message, response=MagicMock())
    elif error == "LocalEntryNotFoundError":
        raised = hub_errors.LocalEntryNotFoundError("An error happened while trying to locate the files on the Hub.\nMore.")
    else:
        raised = ConnectionError("[Errno -2] Name or service not known")

    def fail(*args, **kwargs):
        raise raised
    monkeypatch.setattr(huggingface_hub, "list_repo_files", fail)
    argv = ["download.py", "--repo_id", "meta-llama/Llama-2-7b-hf"] + (["--access_token", token] if token else [])
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.delenv("LIT_LORA_DEBUG", raising=False)
    from lit_lora.workflows.cli import run

    with pytest.raises(SystemExit) as exit_info:
        run(download_script["main"])
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err
    assert stderr.startswith("error: ") and stderr.count("\n") == 1
    assert expected in stderr
