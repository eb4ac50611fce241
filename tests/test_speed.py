"""The speed rooms' rewritten formulas against the plain calls they replace, on both paths' own terms:
the same numbers to the rounding of the dtype, checked against a float64 computation of the formula."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lit_lora.data import IGNORE_INDEX
from lit_lora.model import naive_attention
from lit_lora.speed.decoding import OneTokenForms, matvec_as_reduction, one_query_attention
from lit_lora.speed.row_kernels import MAX_ROWS, RowKernels, row_kernels
from lit_lora.speed.training import TrainingForms, compiled_cross_entropy


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_one_row_matrix_vector_product_is_the_linear_layer(dtype, tolerance):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(300, 96, generator=generator).to(dtype)
    x = torch.randn(1, 1, 96, generator=generator).to(dtype)
    exact = x.double() @ weight.double().T  # (1, 1, 300)
    ours = matvec_as_reduction(x, weight)
    assert ours.shape == (1, 1, 300) and ours.dtype == dtype
    torch.testing.assert_close(ours.double(), exact, rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(F.linear(x, weight).double(), exact, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("padded", [False, True])
def test_one_query_attention_is_grouped_scaled_dot_product_attention(padded):
    """GQA (8 query heads over 2 key/value heads) for one query over a cache, with the causal mask of
    one position, or each row its own mask (left padding)."""
    generator = torch.Generator().manual_seed(1)
    B, nh, nkv, S, hs = 3, 8, 2, 11, 16
    q = torch.randn(B, nh, 1, hs, generator=generator)
    k, v = torch.randn(2, B, nkv, S, hs, generator=generator)
    mask = torch.arange(S)[None, :] <= 6  # (1, S): slots 0..6 are filled
    if padded:
        mask = (mask & (torch.arange(S)[None, :] >= torch.tensor([[0], [2], [4]]))).view(B, 1, 1, S)
    ours = one_query_attention(q, k, v, mask)
    repeat = lambda t: t.repeat_interleave(nh // nkv, dim=1).double()  # noqa: E731
    exact = naive_attention(q.double(), repeat(k), repeat(v), mask.expand(B, 1, 1, S))
    torch.testing.assert_close(ours.double(), exact, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True).double(), exact,
                               rtol=1e-5, atol=1e-6)


def test_one_token_forms_rewrite_only_one_row_and_one_query():
    """A batch of rows keeps the matrix product, a plain sequence the fused attention kernel: the mode
    returns exactly what the call returns without it."""
    generator = torch.Generator().manual_seed(2)
    weight, rows = torch.randn(40, 24, generator=generator), torch.randn(4, 24, generator=generator)
    q, k, v = torch.randn(3, 1, 2, 5, 8, generator=generator)
    with OneTokenForms():
        assert torch.equal(F.linear(rows[:1], weight), matvec_as_reduction(rows[:1], weight))  # rewritten
        assert torch.equal(F.linear(rows, weight), rows @ weight.T)
        kept = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert torch.equal(kept, F.scaled_dot_product_attention(q, k, v, is_causal=True))


def bf16_rows_op():
    """The kernel as built here: every build has it (AVX512-BF16 instructions, or the plain loop, which
    `row_kernels()` does not hand out because inductor's loop is as fast)."""
    if row_kernels().int8_rows is None:
        pytest.skip("the C++ decoding kernels could not be built here (a line on stderr says why)")
    return torch.ops.lit_lora.bf16_rows


@pytest.mark.parametrize("rows, K", [(1, 512), (1, 96), (5, 1376)])  # K an even and odd multiple of 32
def test_bf16_rows_kernel_is_the_exact_product_rounded_to_bf16(rows, K):
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(rows, K, generator=generator).to(torch.bfloat16)
    weight = torch.randn(300, K, generator=generator).to(torch.bfloat16)
    exact = x.double() @ weight.double().T  # (rows, 300)
    ours = bf16_rows_op()(x, weight)
    assert ours.shape == (rows, 300) and ours.dtype == torch.bfloat16
    # float32 sums of exact products, rounded once to bf16 (a relative step of 2^-8); one weight left out
    # of a sum would move it by ~1
    torch.testing.assert_close(ours.double(), exact, rtol=2 ** -8, atol=1e-3)


def test_bf16_rows_kernel_refuses_what_it_cannot_multiply():
    kernel = bf16_rows_op()
    weight = torch.zeros(8, 64, dtype=torch.bfloat16)
    for x, message in ((torch.zeros(1, 64), "must be bfloat16"), (torch.zeros(1, 32, dtype=torch.bfloat16), "do not match")):
        with pytest.raises(RuntimeError, match=message):
            kernel(x, weight)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        kernel(torch.zeros(1, 40, dtype=torch.bfloat16), torch.zeros(8, 40, dtype=torch.bfloat16))


PLAIN_KERNELS_CHECK = """
import torch
from lit_lora.speed.int8 import Int8Linear
from lit_lora.speed.row_kernels import row_kernels
assert torch.backends.cpu.get_cpu_capability() == "DEFAULT"
kernels = row_kernels()
assert kernels.bf16_rows is None  # the plain loop is built, not handed out
torch.manual_seed(0)
layer = Int8Linear.from_weight(torch.randn(70, 2080) * 0.02)
x = torch.randn(3, 2080)
exact = x.double() @ layer.dequantize(torch.float64).T
int8_error = (kernels.int8_rows(x, layer.weight_int8, layer.scale).double() - exact).abs().max() / exact.abs().max()
x16, w16 = x.bfloat16(), torch.randn(70, 2080).bfloat16()
exact = x16.double() @ w16.double().T
bf16_error = (torch.ops.lit_lora.bf16_rows(x16, w16).double() - exact).abs().max() / exact.abs().max()
print(int8_error.item(), bf16_error.item())
"""


def test_kernels_without_avx2_build_their_plain_loops_and_agree():
    """ATEN_CPU_CAPABILITY=default: lit_lora/speed/row_kernels.cpp is built without vector instructions, so its
    plain loops run; within float32 rounding (int8, with 16-bit activations) and bf16's (bf16)."""
    if row_kernels().int8_rows is None:
        pytest.skip("the C++ decoding kernels could not be built here (a line on stderr says why)")
    done = subprocess.run([sys.executable, "-c", PLAIN_KERNELS_CHECK], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], env={**os.environ, "ATEN_CPU_CAPABILITY": "default"},
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    int8_error, bf16_error = map(float, done.stdout.split()[-2:])
    assert int8_error < 1e-4 and bf16_error < 2 ** -8


def test_kernels_that_cannot_be_built_say_so_in_one_line_and_leave_the_other_paths(monkeypatch, tmp_path, capsys):
    import lit_lora.speed.row_kernels as module

    def failed_build(name, source, flags):
        return "RuntimeError: Error building extension 'lit_lora_row_kernels'"  # the child's last line, not pages

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # nothing cached there
    monkeypatch.setattr(module, "build_in_child", failed_build)
    assert row_kernels.__wrapped__() == RowKernels(int8_rows=None, bf16_rows=None)  # uncached: the built ones stay
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == "building the decoding kernels (first use, ~40 s)" and len(err) == 2
    assert "could not be built (RuntimeError: Error building extension 'lit_lora_row_kernels')" in err[1]


def test_one_token_forms_send_a_few_bf16_rows_to_the_kernel_they_are_given():
    """Given the kernel, up to MAX_ROWS bf16 rows with a multiple of 32 inputs go to it; other dtypes,
    widths, longer inputs and calls needing a gradient keep the reduction (one row) or the matrix product."""
    kernel = bf16_rows_op()
    seen = []

    def spy(x, weight):
        seen.append(tuple(x.shape))
        return kernel(x, weight)

    generator = torch.Generator().manual_seed(4)
    weight, rows = torch.randn(40, 64, generator=generator), torch.randn(MAX_ROWS + 1, 1, 64, generator=generator)
    weight16, rows16 = weight.to(torch.bfloat16), rows.to(torch.bfloat16)
    narrow_weight, narrow_row = weight16[:, :24], rows16[:1, :, :24]
    trained = weight16.clone().requires_grad_()
    with OneTokenForms(spy):
        for n in (1, 4, MAX_ROWS):
            assert torch.equal(F.linear(rows16[:n], weight16), kernel(rows16[:n].reshape(n, 64), weight16).reshape(n, 1, 40))
        assert seen == [(1, 64), (4, 64), (MAX_ROWS, 64)]
        assert torch.equal(F.linear(rows16, weight16), rows16 @ weight16.T)
        assert torch.equal(F.linear(rows[:1], weight), matvec_as_reduction(rows[:1], weight))
        assert torch.equal(F.linear(narrow_row, narrow_weight), matvec_as_reduction(narrow_row, narrow_weight))
        F.linear(rows16[:1], trained).sum().backward()  # a gradient to compute: not the kernel, which has no backward
        assert len(seen) == 3 and trained.grad is not None


@pytest.mark.parametrize("batch", [1, 3])
def test_compiled_bf16_decoding_gives_the_eager_logits(batch):
    """Inductor's graph around the bf16 kernel (where the CPU has AVX512-BF16; its own loops and matrix
    products elsewhere) against the eager step, to bf16's rounding, for one prompt and a batch."""
    from lit_lora.model import Config, Llama
    from lit_lora.speed.decoding import CompiledDecoding

    torch.manual_seed(0)
    model = Llama(Config(block_size=32, vocab_size=96, n_layer=2, n_head=4, n_embd=64, intermediate_size=160))
    model = model.to(torch.bfloat16).eval()
    compiled = CompiledDecoding(model)
    with torch.inference_mode():
        idx, input_pos = torch.tensor([[9], [4], [50]])[:batch], torch.tensor([0])
        model.set_kv_cache(batch, 16)
        expected = model(idx, input_pos)  # (B, 1, 96)
        model.set_kv_cache(batch, 16)
        ours = compiled(idx, input_pos)
    torch.testing.assert_close(ours.float(), expected.float(), rtol=3e-2, atol=3e-2 * expected.abs().max().item())


@pytest.mark.parametrize("packed", [False, True])
def test_training_forms_attend_like_the_fused_kernel_in_bf16(packed):
    """Short bf16 rows take `naive_attention` under `TrainingForms`, forward and backward: the same values
    as the fused kernel, both within bf16 rounding of float64; float32 keeps the fused kernel bit for bit."""
    generator = torch.Generator().manual_seed(3)
    B, nh, T, hs = 2, 4, 24, 16
    q, k, v = (t.requires_grad_() for t in torch.randn(3, B, nh, T, hs, generator=generator).to(torch.bfloat16))
    mask = None
    if packed:  # two samples per row, each attending only to itself
        segment = (torch.arange(T) >= 10).long()
        mask = ((segment[:, None] == segment[None, :]) & torch.ones(T, T, dtype=torch.bool).tril()).expand(B, 1, T, T)
    kwargs = {"attn_mask": mask} if packed else {"is_causal": True}
    exact = naive_attention(q.double(), k.double(), v.double(), mask)
    grad_out = torch.randn(B, nh, T, hs, generator=generator)
    results = []
    for forms in (TrainingForms(), None):
        if forms is None:
            out = F.scaled_dot_product_attention(q, k, v, **kwargs)
        else:
            with forms:
                out = F.scaled_dot_product_attention(q, k, v, **kwargs)
        grads = torch.autograd.grad(out, (q, k, v), grad_out.to(out.dtype))
        results.append((out, grads))
        torch.testing.assert_close(out.double(), exact, rtol=2e-2, atol=2e-2)
    assert torch.equal(results[0][0], naive_attention(q, k, v, mask))  # the forms took the formula
    exact_grads = torch.autograd.grad(exact, (q, k, v), grad_out.double())  # the float64 gradient, rounded inputs
    for ours, theirs, reference in zip(results[0][1], results[1][1], exact_grads):
        scale = reference.abs().max().item()
        assert (ours.double() - reference).abs().max() <= 3e-2 * scale
        assert (theirs.double() - reference).abs().max() <= 3e-2 * scale
    q32, k32, v32 = (t.detach().float() for t in (q, k, v))
    with TrainingForms():
        kept = F.scaled_dot_product_attention(q32, k32, v32, **kwargs)
    assert torch.equal(kept, F.scaled_dot_product_attention(q32, k32, v32, **kwargs))


def test_compiled_cross_entropy_is_cross_entropy_in_value_and_gradient():
    """The compiled loss against F.cross_entropy on a float32 copy, with ignored rows, bf16 and float32."""
    generator = torch.Generator().manual_seed(4)
    targets = torch.randint(0, 50, (12,), generator=generator)
    targets[[0, 5, 6]] = IGNORE_INDEX
    for dtype, tolerance in ((torch.float32, 1e-6), (torch.bfloat16, 1e-2)):
        logits = (3 * torch.randn(12, 50, generator=generator)).to(dtype).requires_grad_()
        loss = compiled_cross_entropy(logits, targets)
        (grad,) = torch.autograd.grad(loss, logits)
        exact_logits = logits.detach().double().requires_grad_()
        exact = F.cross_entropy(exact_logits, targets, ignore_index=IGNORE_INDEX)
        (exact_grad,) = torch.autograd.grad(exact, exact_logits)
        assert loss.dtype == torch.float32 and grad.dtype == dtype
        torch.testing.assert_close(loss.double(), exact, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(grad.double(), exact_grad, rtol=tolerance, atol=tolerance * exact_grad.abs().max().item())


def test_compiled_decoding_skips_guards_only_for_steps_it_has_compiled():
    """After the first step of a shape, `CompiledDecoding` runs without dynamo's guard checks; a call in
    another grad mode or batch size must compile anew (not run the other graph, nor fail) and give the
    eager model's logits."""
    from lit_lora.generate import generate
    from lit_lora.model import Config, Llama
    from lit_lora.speed.decoding import CompiledDecoding

    torch.manual_seed(0)
    model = Llama(Config(block_size=32, vocab_size=64, n_layer=2, n_head=4, n_embd=32, intermediate_size=64)).eval()
    compiled = CompiledDecoding(model, backend="aot_eager")
    prompt = torch.tensor([3, 5, 7])
    assert torch.equal(generate(compiled, prompt, 6, temperature=0.0, cache_length=16),
                       generate(model, prompt, 6, temperature=0.0, cache_length=16))
    for batch, mode in ((1, torch.no_grad), (2, torch.inference_mode)):
        with mode():
            idx, input_pos = torch.full((batch, 1), 9), torch.tensor([4])
            model.set_kv_cache(batch, 16)
            expected = model(idx, input_pos)
            model.set_kv_cache(batch, 16)
            torch.testing.assert_close(compiled(idx, input_pos), expected, rtol=1e-5, atol=1e-5)
    assert len(compiled.compiled_shapes) == 3
