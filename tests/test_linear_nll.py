"""The fused output-layer loss against autograd's cross-entropy: values and gradients in float64, float32
statistics under bf16 autocast, row blocks, the single-backward guard."""
import pytest
import torch
import torch.nn.functional as F

import utils.model.linear_nll as linear_nll_module
from utils.model.linear_nll import linear_nll


def inputs(n=7, d=5, vocab=11, dtype=torch.float64, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, d, generator=g, dtype=dtype) * 2).requires_grad_()
    weight = torch.randn(vocab, d, generator=g, dtype=dtype).requires_grad_()
    b = torch.randn(vocab, generator=g, dtype=dtype).requires_grad_() if bias else None
    target = torch.randint(0, vocab, (n,), generator=g)
    return hidden, weight, b, target


def grads(loss, tensors):
    return torch.autograd.grad(loss, [t for t in tensors if t is not None])


@pytest.mark.parametrize("few_rows", [False, True])                # also the [V, d]·[d, N] matmul (few rows)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("block_elements", [None, 11 * 2])          # default blocks, and blocks of 2 rows
def test_values_and_gradients_equal_cross_entropy_in_float64(bias, block_elements, few_rows, monkeypatch):
    if block_elements is not None:
        monkeypatch.setitem(linear_nll_module._BLOCK_ELEMENTS, "cpu", block_elements)
    monkeypatch.setattr(linear_nll_module, "_FEW_ROWS", 0 if few_rows else 1 << 30)
    hidden, weight, b, target = inputs(bias=bias)
    upstream = torch.linspace(0.5, 2.0, hidden.size(0), dtype=torch.float64)      # a non-uniform grad_output
    nll = linear_nll(hidden, weight, b, target)
    expected = F.cross_entropy(F.linear(hidden, weight, b), target, reduction="none")
    assert nll.dtype == torch.float64
    assert (nll - expected).abs().max().item() < 1e-12
    for got, want in zip(grads((nll * upstream).sum(), (hidden, weight, b)),
                         grads((expected * upstream).sum(), (hidden, weight, b))):
        assert (got - want).abs().max().item() < 1e-12


def test_bf16_autocast_gives_float32_nll_and_float32_gradients_close_to_float32():
    hidden, weight, b, target = (t.float().detach().requires_grad_() if t.is_floating_point() else t
                                 for t in inputs(n=32, d=16, vocab=50, seed=1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        nll = linear_nll(hidden, weight, b, target)
    assert nll.dtype == torch.float32
    got = grads(nll.sum(), (hidden, weight, b))
    assert [g.dtype for g in got] == [torch.float32] * 3
    expected = F.cross_entropy(F.linear(hidden, weight, b), target, reduction="none")
    want = grads(expected.sum(), (hidden, weight, b))
    assert (nll - expected).abs().max().item() < 0.1                  # bf16 logits: ~3 significant digits
    for g, w in zip(got, want):
        assert (g - w).abs().max().item() < 0.05 * w.abs().max().item()


def test_a_second_backward_through_the_same_graph_is_refused():
    hidden, weight, b, target = inputs()
    loss = linear_nll(hidden, weight, b, target).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="differentiated once"):
        loss.backward()


def test_no_rows_gives_an_empty_loss_and_zero_gradients():
    hidden, weight, b, _ = inputs()
    nll = linear_nll(hidden[:0], weight, b, torch.zeros(0, dtype=torch.long))
    assert nll.shape == (0,) and nll.dtype == torch.float64
    assert all(g.abs().sum().item() == 0 for g in grads(nll.sum(), (hidden, weight, b)))
