"""QLoRA (lit_lora/speed/quantize.py) against independent references: the QLoRA paper's NF4 table, bitsandbytes'
quantize_4bit / dequantize_4bit (bit for bit, double quantization included), and float models."""

import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lit_lora.files.checkpoint import WEIGHTS_NAME, CheckpointError, save_checkpoint
from lit_lora.lora import LoRAConfig, LoRALinear, add_lora, lora_layers, mark_only_lora_as_trainable, merge_lora
from lit_lora.methods import apply_weights, save_weights
from lit_lora.model import Config, Llama
from lit_lora.nf4 import (DYNAMIC_8BIT_CODE, NF4_CODE, Linear4bit, dequantize_absmax, dequantize_nf4, quantize_absmax,
                          quantize_blockwise, quantize_nf4)
from lit_lora.speed.int8 import Int8Linear
from lit_lora.speed.quantize import (bits_per_parameter, dequantize_model, load_checkpoint_quantized, merge_lora_quantized,
                                     quantize_model, quantized_storage)
from lit_lora.speed.row_kernels import MAX_ROWS, row_kernels


ROOT = Path(__file__).resolve().parents[1]

# QLoRA paper (Dettmers et al. 2023), Appendix E: the NF4 data type, exactly as printed there.
PAPER_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
             -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
             0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
             0.7229568362236023, 1.0]

# Whole blocks; a partial last block; blocks spanning rows; an odd count; less than one block; > 256 blocks.
SHAPES = [(64, 64), (100, 70), (48, 80), (33, 17), (1, 5), (300, 100)]


def tiny_config(**overrides) -> Config:
    return Config(**{**dict(name="tiny-q", block_size=64, vocab_size=256, n_layer=2, n_head=4, n_embd=64, n_kv_heads=2,
                            intermediate_size=176), **overrides})


def make_weight(shape, kind: str, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """'random': N(0, 0.02). 'real-looking': what pretrained LLM weights look like: heavy tails
    (Student-t), a few outlier input features 20x larger, and an all-zero row."""
    generator = torch.Generator().manual_seed(seed)
    if kind == "random":
        weight = torch.randn(shape, generator=generator) * 0.02
    else:  # Student-t with 4 degrees of freedom: a normal over the root mean square of 4 normals
        normal, chi = torch.randn(shape, generator=generator), torch.randn((4, *shape), generator=generator)
        weight = normal / chi.square().mean(dim=0).sqrt() * 0.01
        weight[:, torch.randperm(shape[1], generator=generator)[:2]] *= 20
        weight[0] = 0
    return weight.to(dtype)


def bitsandbytes_functional():
    return pytest.importorskip("bitsandbytes.functional", reason="the bitsandbytes reference is not installed")


def bitsandbytes_torch_kernel(name: str, *args):
    """Call bitsandbytes' pure-PyTorch kernel for op `name`: the implementation it runs on every device
    without a native one. bitsandbytes 0.50's CPU C kernels are not usable as a bit-exact reference:
    dequantize_4bit returns wrong values for some shapes whose 64-blocks span rows (e.g. (48, 80)), and
    the 8-bit quantize_blockwise search picks a neighbour of the nearest code for a few values in 10,000
    (see test_double_quantization_matches_bitsandbytes). `force_eager`: bitsandbytes wraps the kernel in
    torch.compile, which would recompile for every shape."""
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    with torch.compiler.set_stance("force_eager"):
        return getattr(torch.ops.bitsandbytes, name).default.redispatch(keys, *args)


# ---------------------------------------------------------------------------------------------
# The lookup tables
# ---------------------------------------------------------------------------------------------

def test_nf4_code_is_the_papers_table():
    assert NF4_CODE.dtype == torch.float32
    assert NF4_CODE.tolist() == [torch.tensor(v, dtype=torch.float32).item() for v in PAPER_NF4]
    assert (NF4_CODE < 0).sum() == 7 and (NF4_CODE > 0).sum() == 8 and (NF4_CODE == 0).sum() == 1


def test_codes_equal_bitsandbytes_tables():
    bnb_functional = bitsandbytes_functional()
    assert torch.equal(NF4_CODE, bnb_functional.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(DYNAMIC_8BIT_CODE, bnb_functional.create_dynamic_map())


# ---------------------------------------------------------------------------------------------
# Quantization against bitsandbytes, bit for bit
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["random", "real-looking"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_nf4_matches_bitsandbytes(shape, dtype, kind):
    bnb_functional = bitsandbytes_functional()
    weight = make_weight(shape, kind, dtype)
    packed, absmax = quantize_nf4(weight)
    ref_packed, ref_state = bnb_functional.quantize_4bit(weight, quant_type="nf4", blocksize=64)
    assert packed.dtype == torch.uint8 and packed.shape == (math.ceil(weight.numel() / 2),)
    assert torch.equal(packed, ref_packed.view(-1))
    # For an all-zero last block bitsandbytes stores its divide-by-zero guard 1e-38 as absmax; both give 0.
    assert torch.equal(absmax, ref_state.absmax.masked_fill(ref_state.absmax <= 1e-38, 0))
    expected = bitsandbytes_torch_kernel("dequantize_4bit", ref_packed, ref_state.absmax, 64, "nf4", list(shape), dtype)
    assert torch.equal(dequantize_nf4(packed, absmax, shape, dtype), expected)


@pytest.mark.parametrize("shape", [(300, 100), (1000, 70), (48, 80)])
def test_double_quantization_matches_bitsandbytes(shape):
    bnb_functional = bitsandbytes_functional()
    weight = make_weight(shape, "real-looking", torch.bfloat16)
    layer = Linear4bit.from_weight(weight, mode="nf4-dq")
    ref_packed, ref_state = bnb_functional.quantize_4bit(weight, quant_type="nf4", blocksize=64, compress_statistics=True)
    assert torch.equal(layer.packed_weight, ref_packed.view(-1))
    assert torch.equal(layer.absmax_offset, ref_state.offset)
    assert torch.equal(layer.absmax_scales, ref_state.state2.absmax)
    assert ref_state.state2.blocksize == 256

    # The 8-bit codes: identical to bitsandbytes' PyTorch kernel...
    _, absmax = quantize_nf4(weight)
    ref_codes, ref_scales = bitsandbytes_torch_kernel("quantize_blockwise", absmax - absmax.mean(),
                                                      bnb_functional.create_dynamic_map(), 256)
    assert torch.equal(layer.absmax_codes, ref_codes) and torch.equal(layer.absmax_scales, ref_scales)
    # ...and where bitsandbytes' CPU kernel differs, ours is the nearer code (a rare binary-search slip there).
    centred = (absmax - layer.absmax_offset) / layer.absmax_scales.repeat_interleave(256)[:absmax.numel()]
    ours = (centred - DYNAMIC_8BIT_CODE[layer.absmax_codes.long()]).abs()
    theirs = (centred - DYNAMIC_8BIT_CODE[ref_state.absmax.long()]).abs()
    assert (ours <= theirs).all()
    assert (layer.absmax_codes != ref_state.absmax).float().mean() < 0.01

    # Dequantizing bitsandbytes' own double-quantized state gives bitsandbytes' values exactly.
    absmax_back = dequantize_absmax(ref_state.absmax, ref_state.state2.absmax, ref_state.offset)
    expected_absmax = bnb_functional.dequantize_blockwise(ref_state.absmax, ref_state.state2) + ref_state.offset
    assert torch.equal(absmax_back, expected_absmax)
    expected = bitsandbytes_torch_kernel("dequantize_4bit", ref_packed, expected_absmax, 64, "nf4", list(shape), torch.bfloat16)
    assert torch.equal(dequantize_nf4(ref_packed.view(-1), absmax_back, shape, torch.bfloat16), expected)


def test_quantize_blockwise_picks_the_nearest_code():
    """No reference needed: the index is argmin |w / absmax - code| (the naive formula), and the
    round-trip error of each weight is at most half the widest gap of the table times its absmax."""
    weight = make_weight((70, 90), "real-looking", torch.float32, seed=3)
    indices, absmax = quantize_blockwise(weight, NF4_CODE, 64)
    n = weight.numel()
    scaled = F.pad(weight.reshape(-1), (0, 64 * len(absmax) - n)).view(-1, 64) / absmax.clamp(min=1e-38)[:, None]
    naive = (scaled.reshape(-1, 1) - NF4_CODE).abs().argmin(dim=1)
    assert torch.equal(indices.long(), naive)
    restored = dequantize_nf4(quantize_nf4(weight)[0], absmax, weight.shape)
    bound = (NF4_CODE.diff().max() / 2) * absmax.repeat_interleave(64)[:n].view(weight.shape)
    assert ((restored - weight).abs() <= bound + 1e-7).all()
    assert (restored[0] == 0).all()  # an all-zero row stays exactly zero


def test_double_quantized_scales_are_close():
    """Each absmax comes back within half the widest gap of the 8-bit code (0.007) times its block's
    scale, i.e. to ~1 % of the largest deviation from the mean in its block of 256."""
    absmax = torch.rand(1000, generator=torch.Generator().manual_seed(0)) * 0.1 + 0.01
    codes, scales, offset = quantize_absmax(absmax)
    assert codes.dtype == torch.uint8 and scales.shape == (4,) and offset.shape == ()
    error = (dequantize_absmax(codes, scales, offset) - absmax).abs()
    assert (error <= DYNAMIC_8BIT_CODE.diff().max() / 2 * scales.repeat_interleave(256)[:1000] + 1e-7).all()
    assert (error / absmax).max() < 0.05


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="NaN or infinite"):
        quantize_nf4(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="floating-point"):
        quantize_nf4(torch.ones(4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="quantization mode"):
        Linear4bit(4, 4, mode="int4")
    with pytest.raises(ValueError, match="does not fit"):
        Linear4bit(8, 4).load_weight(torch.zeros(8, 4))


# ---------------------------------------------------------------------------------------------
# Memory: measured from tensor sizes
# ---------------------------------------------------------------------------------------------

def test_bits_per_parameter_measured_on_a_large_layer():
    layer = Linear4bit(4096, 11008, mode="nf4-dq", device="meta")
    nbytes = sum(b.numel() * b.element_size() for b in layer.buffers())
    assert nbytes * 8 / (4096 * 11008) == pytest.approx(bits_per_parameter("nf4-dq"), abs=1e-4)
    assert bits_per_parameter("nf4-dq") == pytest.approx(4.127, abs=1e-3) and bits_per_parameter("nf4") == 4.5
    assert not list(layer.parameters())  # buffers only: an optimizer never sees the 4-bit weights


def test_7b_weights_in_4bit_on_the_meta_device():
    """Acceptance: the figures benchmarks/qlora_memory.py prints (bf16 model, lm_head and embedding kept)."""
    with torch.device("meta"):
        model = Llama(Config.from_name("7B")).to(torch.bfloat16)
    bf16_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    quantize_model(model, "nf4-dq")
    storage = quantized_storage(model)
    assert 13.4e9 < bf16_bytes < 13.6e9
    assert 3.5e9 < storage["total"] < 3.9e9
    assert storage["total"] <= 0.30 * bf16_bytes
    assert storage["codes"] == storage["quantized_params"] // 2


def test_qlora_memory_script_prints_the_7b_figures():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "qlora_memory.py"), "--sizes", "[7B]"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "nf4-dq     3.87 GB" in out.stdout and "bf16      13.48 GB" in out.stdout


LOAD_CHILD = r"""
import json, sys, torch
from lit_lora.model import Config, Llama
from lit_lora.speed.quantize import load_checkpoint_quantized, quantize_model, quantized_storage
def status_mb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
with torch.device("meta"):  # warm up PyTorch's one-time initialisation
    warmup = Llama(Config.from_name("tiny"))
warmup.to_empty(device="cpu")
with torch.no_grad():
    for p in warmup.parameters():
        p.zero_()
quantize_model(warmup)
open("/proc/self/clear_refs", "w").write("5")  # peak RSS := current RSS
before = status_mb("VmRSS")
model = load_checkpoint_quantized(sys.argv[1], mode="nf4-dq", dtype=torch.bfloat16)
print(json.dumps({"peak_mb": status_mb("VmHWM") - before, "model_mb": quantized_storage(model)["total"] / 2**20}))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to reset the peak RSS")
def test_loading_into_4bit_never_holds_the_16bit_model(tmp_path):
    """Peak RSS (subprocess) while loading a ~120 MB bf16 checkpoint straight into 4 bits stays near
    the 4-bit size plus one matrix's temporaries (benchmarks/qlora_memory.py --measure_load does ~310 MB)."""
    config = tiny_config(vocab_size=2048, n_layer=8, n_head=8, n_kv_heads=8, n_embd=768, intermediate_size=2048)
    with torch.device("meta"):
        shapes = {name: p.shape for name, p in Llama(config).state_dict().items()}
    state = {name: (torch.randn(shape) * 0.02).to(torch.bfloat16) for name, shape in shapes.items()}
    checkpoint_mb = sum(t.numel() * 2 for t in state.values()) / 2**20
    save_checkpoint(tmp_path, state, config)
    del state
    out = subprocess.run([sys.executable, "-c", LOAD_CHILD, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"checkpoint {checkpoint_mb:.0f} MB, 4-bit model {measured['model_mb']:.0f} MB, peak +{measured['peak_mb']:.0f} MB")
    largest_matrix_mb = 768 * 2048 * 2 / 2**20  # bf16; quantizing it needs ~6x that in temporaries
    assert measured["model_mb"] < 0.35 * checkpoint_mb
    assert measured["peak_mb"] < measured["model_mb"] + 8 * largest_matrix_mb
    assert measured["peak_mb"] < 0.6 * checkpoint_mb


# ---------------------------------------------------------------------------------------------
# The 4-bit layer
# ---------------------------------------------------------------------------------------------

def test_linear4bit_forward_and_backward_use_the_dequantized_weight():
    weight = make_weight((48, 80), "random", torch.float32)
    layer = Linear4bit.from_weight(weight)
    dense = layer.dequantize()  # (out, in)
    x = torch.randn(2, 5, 80, requires_grad=True)
    out = layer(x)
    assert torch.equal(out, F.linear(x, dense))
    out.square().sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    F.linear(x_ref, dense).square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-6, atol=1e-6)


def test_linear4bit_saves_no_dense_weight_for_backward():
    layer = Linear4bit.from_weight(torch.randn(64, 96) * 0.02)
    x = torch.randn(3, 96, requires_grad=True)

    def saved_shapes(fn):
        shapes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
            fn()
        return shapes

    assert (96, 64) in saved_shapes(lambda: F.linear(x, layer.dequantize()))  # W^T: what the custom Function avoids
    assert saved_shapes(lambda: layer(x)) == []


def test_module_to_dtype_keeps_the_quantization_state_exact():
    layer = Linear4bit.from_weight(torch.randn(32, 64) * 0.02, mode="nf4-dq")
    before = {name: b.clone() for name, b in layer.named_buffers()}
    layer.to(torch.bfloat16)
    assert layer.compute_dtype == torch.bfloat16
    for name, buffer in layer.named_buffers():
        assert buffer.dtype == before[name].dtype and torch.equal(buffer, before[name])
    assert layer(torch.randn(2, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16
    layer.float()
    assert layer.compute_dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# Whole models
# ---------------------------------------------------------------------------------------------

def test_quantized_tiny_llama_is_close_to_the_float_one():
    """Acceptance: relative L2 error of the logits < 0.15 (measured ~0.10) for N(0, 0.02) weights;
    and exactly the logits of the float model given the dequantized weights."""
    torch.manual_seed(0)
    model = Llama(tiny_config()).eval()
    idx = torch.randint(0, 256, (2, 16))
    expected = model(idx)
    quantized = copy.deepcopy(model)
    replaced = quantize_model(quantized, mode="nf4-dq")
    assert sorted(replaced) == sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head")
    assert isinstance(quantized.lm_head, nn.Linear)  # skipped by default
    logits = quantized(idx)
    assert ((logits - expected).norm() / expected.norm()) < 0.15
    removed = dequantize_model(quantized)
    assert sorted(removed) == sorted(replaced) and not any(isinstance(m, Linear4bit) for m in quantized.modules())
    assert torch.equal(quantized(idx), logits)


def test_quantize_model_refusals():
    model = Llama(tiny_config(tie_embeddings=True))
    with pytest.raises(ValueError, match="tied"):
        quantize_model(model, skip=())
    with pytest.raises(ValueError, match="mode"):
        quantize_model(model, mode="fp4")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            quantize_model(model, backend="bitsandbytes")


@pytest.mark.parametrize("tie", [False, True])
def test_load_checkpoint_quantized_equals_quantizing_the_loaded_model(tmp_path, tie):
    torch.manual_seed(0)
    model = Llama(tiny_config(tie_embeddings=tie))
    save_checkpoint(tmp_path, model.state_dict(), model.config)
    reference = copy.deepcopy(model)
    quantize_model(reference, mode="nf4")
    loaded = load_checkpoint_quantized(tmp_path, mode="nf4", dtype=torch.float32)
    assert loaded.state_dict().keys() == reference.state_dict().keys()
    for name, tensor in reference.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    if tie:
        assert loaded.lm_head.weight is loaded.tok_embeddings.weight
    idx = torch.randint(0, 256, (1, 8))
    # Equal tensors, two loading routes: `loaded` holds the file's tensors assigned on the meta-device model,
    # `reference` deep copies; other memory alignments may take other kernel paths, so a float32 tolerance.
    expected = reference(idx)
    torch.testing.assert_close(loaded(idx), expected, rtol=0, atol=1e-5 * expected.abs().max().item())
    assert load_checkpoint_quantized(tmp_path, dtype=torch.bfloat16).tok_embeddings.weight.dtype == torch.bfloat16


def test_load_checkpoint_quantized_bad_files(tmp_path):
    model = Llama(tiny_config())
    state = model.state_dict()
    save_checkpoint(tmp_path / "ok", state, model.config)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint_quantized(tmp_path / "missing")
    (tmp_path / "ok" / WEIGHTS_NAME).rename(tmp_path / "ok.safetensors")
    with pytest.raises(CheckpointError, match=WEIGHTS_NAME + " not found"):
        load_checkpoint_quantized(tmp_path / "ok")
    save_checkpoint(tmp_path / "shape", {**state, "layers.0.attn.q_proj.weight": torch.zeros(3, 3)}, model.config)
    with pytest.raises(CheckpointError, match="wrong shapes: layers.0.attn.q_proj.weight"):
        load_checkpoint_quantized(tmp_path / "shape")
    save_checkpoint(tmp_path / "cut", state, model.config)
    data = (tmp_path / "cut" / WEIGHTS_NAME).read_bytes()
    (tmp_path / "cut" / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint_quantized(tmp_path / "cut")


# ---------------------------------------------------------------------------------------------
# LoRA on 4-bit weights
# ---------------------------------------------------------------------------------------------

def qlora_model(dtype=torch.float32) -> Llama:
    torch.manual_seed(0)
    model = Llama(tiny_config()).to(dtype)
    quantize_model(model, mode="nf4-dq")
    add_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.0, targets=("all",)))
    mark_only_lora_as_trainable(model)
    return model


def test_lora_wraps_linear4bit_and_only_a_b_get_gradients():
    model = qlora_model()
    layers = lora_layers(model)
    assert all(isinstance(layer.base, Linear4bit) for name, layer in layers.items() if name != "lm_head")
    idx = torch.randint(0, 256, (2, 12))
    logits = model(idx)
    F.cross_entropy(logits[:, :-1].reshape(-1, 256), idx[:, 1:].reshape(-1)).backward()
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None}
    lora_names = {f"{name}.lora_{ab}" for name in layers for ab in "AB"}
    assert with_grad == lora_names
    assert all(model.get_parameter(f"{name}.lora_B").grad.abs().sum() > 0 for name in layers)
    assert all(b.grad is None for b in model.buffers())


def test_lora_factors_use_the_compute_dtype():
    layer = lora_layers(qlora_model(torch.bfloat16))["layers.0.attn.q_proj"]
    assert layer.base.compute_dtype == torch.bfloat16 and layer.lora_A.dtype == torch.bfloat16


def test_qlora_adapter_file_applies_to_a_base_loaded_in_4bit(tmp_path):
    torch.manual_seed(0)
    base = Llama(tiny_config())
    save_checkpoint(tmp_path / "base", base.state_dict(), base.config)
    lora_config = LoRAConfig(r=4, alpha=8, dropout=0.0, targets=("q", "v", "down"))
    trained = load_checkpoint_quantized(tmp_path / "base", dtype=torch.float32)
    add_lora(trained, lora_config)
    with torch.no_grad():
        for layer in lora_layers(trained).values():
            layer.lora_B.normal_(0, 0.05)
    save_weights(tmp_path / "lora.safetensors", trained, "lora", lora_config)
    fresh = load_checkpoint_quantized(tmp_path / "base", dtype=torch.float32)
    assert apply_weights(fresh, tmp_path / "lora.safetensors", "lora").config == lora_config
    idx = torch.randint(0, 256, (1, 10))
    assert torch.equal(fresh(idx), trained(idx))


def test_merging_into_4bit_dequantizes_and_adds():
    """Acceptance: merged == unmerged within 1e-5 of the logit scale (float32; no requantization)."""
    model = qlora_model()
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.normal_(0, 0.05)
    idx = torch.randint(0, 256, (2, 12))
    unmerged = model(idx)
    with pytest.raises(RuntimeError, match="merge_lora_quantized"):
        merge_lora(model)  # in place into 4-bit is impossible: a clear pointer to the right function
    requantized = copy.deepcopy(model)
    removed = merge_lora_quantized(model)
    assert all(isinstance(layer, LoRALinear) for layer in removed.values())
    assert not lora_layers(model).keys() - {"lm_head"}
    torch.testing.assert_close(model(idx), unmerged, rtol=0, atol=1e-5 * unmerged.abs().max().item())

    merge_lora_quantized(requantized, requantize=True)
    assert isinstance(requantized.layers[0].attn.q_proj, Linear4bit)
    error = (requantized(idx) - unmerged).norm() / unmerged.norm()
    assert 0 < error < 0.15  # NF4 rounding now also falls on the update


def test_bitsandbytes_backend_layer_holds_the_same_format_and_takes_lora():
    """The optional backend's layer (CUDA in use; bitsandbytes' CPU kernels here): the same packed codes
    and scales as ours, wrapped by LoRA and merged by merge_lora_quantized like ours."""
    pytest.importorskip("bitsandbytes")
    from lit_lora.speed.quantize import _bitsandbytes_linear, dequantized_weight, is_quantized_linear

    weight = make_weight((64, 128), "random", torch.float32)
    layer = _bitsandbytes_linear(weight, "nf4", device="cpu")
    ours = Linear4bit.from_weight(weight, "nf4")
    assert is_quantized_linear(layer)
    assert torch.equal(layer.weight.data.view(-1), ours.packed_weight)
    assert torch.equal(layer.weight.quant_state.absmax, ours.absmax)
    assert torch.equal(dequantized_weight(layer), ours.dequantize())

    model = nn.Sequential(layer)
    add_lora(model, LoRAConfig(r=2, alpha=4, dropout=0.0, targets=("0",)))
    assert model[0].lora_A.dtype == torch.float32  # the compute dtype, not the uint8 storage
    with torch.no_grad():
        model[0].lora_B.normal_(0, 0.05)
    x = torch.randn(3, 128)
    unmerged = model(x)
    torch.testing.assert_close(unmerged, ours(x) + model[0].scaling * (x @ model[0].lora_A.T) @ model[0].lora_B.T,
                               rtol=1e-4, atol=1e-5)
    merge_lora_quantized(model)
    assert type(model[0]) is nn.Linear
    torch.testing.assert_close(model(x), unmerged, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Weight-only int8 (Int8Linear), for decoding
# ---------------------------------------------------------------------------------------------

def test_int8_rounds_each_row_to_its_own_scale():
    torch.manual_seed(0)
    weight = torch.randn(40, 96) * 0.02
    weight[3, 7] = 0.5  # an outlier coarsens its own row only
    weight[5] = 0.0  # an all-zero row stays exactly zero
    layer = Int8Linear.from_weight(weight)
    scale = weight.abs().amax(dim=1) / 127  # the definition, section 6 of lit_lora/speed/quantize.py
    torch.testing.assert_close(layer.scale, scale)
    assert layer.weight_int8.dtype == torch.int8 and layer.weight_int8.abs().max() == 127
    error = (layer.dequantize() - weight).abs()
    assert (error <= scale[:, None] / 2 + 1e-9).all()
    assert not layer.dequantize()[5].any()
    assert error[3].max() > 4 * error[4].max()
    with pytest.raises(ValueError, match="NaN"):
        Int8Linear.from_weight(torch.tensor([[1.0, float("inf")]]))
    with pytest.raises(ValueError, match="does not fit"):
        Int8Linear(8, 4).load_weight(torch.zeros(8, 4))


def int8_product_reference(x: torch.Tensor, layer: Int8Linear) -> torch.Tensor:
    """x times the layer's dequantized weight, in float64."""
    return x.double() @ layer.dequantize(torch.float64).T


def int8_kernel():
    if row_kernels().int8_rows is None:
        pytest.skip("the C++ decoding kernels could not be built here (a line on stderr says why)")
    return row_kernels().int8_rows


@pytest.mark.parametrize("shape", [(64, 64), (176, 64), (512, 1376), (1000, 32), (40, 2080)])
@pytest.mark.parametrize("rows", [1, 5, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_rows_kernel_equals_the_dequantized_matmul(shape, rows, dtype):
    """`int8_rows` of lit_lora/speed/row_kernels.cpp (int16 activations, integer products) against float64 with the
    dequantized weight: within float32 rounding plus the activations' 16-bit rounding, or bf16's rounding
    of the output."""
    kernel = int8_kernel()
    torch.manual_seed(0)
    layer = Int8Linear.from_weight((torch.randn(*shape) * 0.02).to(dtype))
    x = (torch.randn(rows, shape[1]) * 3).to(dtype)
    x[0, :5] = 40.0  # an outlier coarsens its row's 16-bit steps
    reference = int8_product_reference(x, layer)
    out = kernel(x, layer.weight_int8, layer.scale)
    assert out.shape == (rows, shape[0]) and out.dtype == dtype
    tolerance = 1e-4 if dtype == torch.float32 else 8e-3
    torch.testing.assert_close(out.double(), reference, rtol=0, atol=tolerance * reference.abs().max().item())
    assert not kernel(torch.zeros(1, shape[1], dtype=dtype), layer.weight_int8, layer.scale).any()


def test_int8_rows_kernel_refuses_what_it_cannot_multiply():
    kernel = int8_kernel()
    q, scale = torch.zeros(8, 64, dtype=torch.int8), torch.ones(8)
    with pytest.raises(RuntimeError, match="shapes do not match"):
        kernel(torch.zeros(1, 32), q, scale)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        kernel(torch.zeros(1, 48), torch.zeros(8, 48, dtype=torch.int8), scale)
    with pytest.raises(RuntimeError, match="must both be float32 or both bfloat16"):
        kernel(torch.zeros(1, 64, dtype=torch.bfloat16), q, scale)


def test_int8_layer_takes_the_kernel_for_few_rows_and_matrix_products_for_many():
    torch.manual_seed(0)
    layer = Int8Linear.from_weight((torch.randn(96, 64) * 0.02).to(torch.bfloat16))
    if layer.rows_kernel is None:
        pytest.skip("the int8 kernel could not be built here (a line on stderr says why)")
    few, many = torch.randn(2, 8, 64).to(torch.bfloat16), torch.randn(2, MAX_ROWS, 64).to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(layer(few), layer.rows_kernel(few.reshape(16, 64), layer.weight_int8, layer.scale).view(2, 8, 96))
        assert not layer._rows_kernel_applies(many)
        if layer._fused_kernel_applies(many):
            assert torch.equal(layer(many), torch._weight_int8pack_mm(many.reshape(-1, 64), layer.weight_int8,
                                                                      layer.scale).view(2, MAX_ROWS, 96))
    for x in (few.float(), few.requires_grad_()):  # another dtype than the scale's, or a gradient to compute
        assert not layer._rows_kernel_applies(x)


@pytest.mark.parametrize("shape", [(64, 64), (176, 64), (512, 1376), (33, 96), (1000, 32)])
@pytest.mark.parametrize("rows", [1, 5])
def test_int8_fused_kernel_equals_the_dequantized_matmul(shape, rows):
    """PyTorch's private int8 x bf16 CPU kernel (prompts) against float64 with the dequantized weight."""
    torch.manual_seed(0)
    layer = Int8Linear.from_weight((torch.randn(*shape) * 0.02).to(torch.bfloat16))
    x = torch.randn(2, rows, shape[1]).to(torch.bfloat16)
    if not layer._fused_kernel_applies(x):
        pytest.skip("this torch build has no _weight_int8pack_mm")
    fused = torch._weight_int8pack_mm(x.reshape(-1, shape[1]), layer.weight_int8, layer.scale)
    reference = int8_product_reference(x.reshape(-1, shape[1]), layer)
    assert fused.shape == (2 * rows, shape[0]) and fused.dtype == torch.bfloat16
    torch.testing.assert_close(fused.double(), reference, rtol=2e-2, atol=2e-2 * reference.abs().max().item())


def test_int8_kernel_takes_inputs_of_any_layout():
    torch.manual_seed(0)
    layer = Int8Linear.from_weight((torch.randn(32, 64) * 0.02).to(torch.bfloat16))
    x = torch.randn(64, 3).to(torch.bfloat16).t()  # (3, 64), stride 1 along the batch, not the features
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer(x.contiguous()))


@pytest.mark.parametrize("in_features", [8, 33, 100])
def test_int8_shapes_the_kernel_gets_wrong_take_the_dequantizing_path(in_features):
    """In torch 2.13 the fused kernel crashes for in_features 33 or 100 and is wrong for 8 in bf16."""
    torch.manual_seed(0)
    layer = Int8Linear.from_weight((torch.randn(24, in_features) * 0.02).to(torch.bfloat16))
    x = torch.randn(3, in_features).to(torch.bfloat16)
    assert not layer._fused_kernel_applies(x) and layer.rows_kernel is None
    reference = F.linear(x.float(), layer.dequantize(torch.float32))
    torch.testing.assert_close(layer(x).float(), reference, rtol=2e-2, atol=2e-2 * reference.abs().max().item())


def test_int8_layer_passes_gradients_to_its_input():
    torch.manual_seed(0)
    layer = Int8Linear.from_weight(torch.randn(48, 64) * 0.02)
    x = torch.randn(4, 64, requires_grad=True)
    layer(x).pow(2).sum().backward()
    x_reference = x.detach().clone().requires_grad_()
    F.linear(x_reference, layer.dequantize()).pow(2).sum().backward()
    torch.testing.assert_close(x.grad, x_reference.grad)
    assert all(b.grad is None for b in layer.buffers())


@pytest.mark.parametrize("tie", [False, True])
def test_int8_model_stays_close_to_the_float_model(tmp_path, tie):
    torch.manual_seed(0)
    model = Llama(tiny_config(tie_embeddings=tie))
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.5)
    idx = torch.randint(0, 256, (2, 16))
    float_logits = model(idx)
    save_checkpoint(tmp_path, model.state_dict(), model.config)
    quantize_model(model, mode="int8", skip=())
    assert isinstance(model.lm_head, Int8Linear) and isinstance(model.layers[1].mlp.down_proj, Int8Linear)
    error = (model(idx) - float_logits).norm() / float_logits.norm()
    assert error < 0.02
    loaded = load_checkpoint_quantized(tmp_path, mode="int8", dtype=torch.float32, skip=())
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    # Equal tensors, two loading routes (assigned on the meta-device model vs quantized in place): other
    # memory alignments may take other kernel paths, so a float32 tolerance.
    expected = model(idx)
    torch.testing.assert_close(loaded(idx), expected, rtol=0, atol=1e-5 * expected.abs().max().item())
    assert bits_per_parameter("int8") == 8


def test_lora_over_int8_merges_and_requantizes_to_int8():
    torch.manual_seed(0)
    model = Llama(tiny_config())
    quantize_model(model, mode="int8", skip=())
    add_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.0, targets=("q", "v")))
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.normal_(0, 0.05)
    idx = torch.randint(0, 256, (2, 12))
    unmerged = model(idx)
    requantized = copy.deepcopy(model)
    merge_lora_quantized(model)
    torch.testing.assert_close(model(idx), unmerged, rtol=0, atol=1e-5 * unmerged.abs().max().item())
    merge_lora_quantized(requantized, requantize=True)
    assert isinstance(requantized.layers[0].attn.q_proj, Int8Linear)
    assert (requantized(idx) - unmerged).norm() / unmerged.norm() < 0.02
