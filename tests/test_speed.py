"""The speed rooms' rewritten formulas against the plain calls they replace, on both paths' own terms:
the same numbers to the rounding of the dtype, checked against a float64 computation of the formula."""

import pytest
import torch
import torch.nn.functional as F

from lit_lora.data import IGNORE_INDEX
from lit_lora.model import naive_attention
from lit_lora.speed import OneTokenForms, matvec_as_reduction, one_query_attention
from lit_lora.speed_training import TrainingForms, compiled_cross_entropy


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
    from lit_lora.speed import CompiledDecoding

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
