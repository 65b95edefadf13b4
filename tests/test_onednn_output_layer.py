"""The output layer's float32 CPU matmuls through oneDNN (utils/model/linear_nll.py: onednn_applies): which
dtypes take it, its results against float64 and against the BLAS path, the fallback where the kernel is
missing, and torch.compile over it."""
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import utils.model.linear_nll as linear_nll_module
from utils.model.adaptive_nll import shared_table_adaptive_nll
from utils.model.linear_nll import linear_nll
from numerics import assert_rounding_close

needs_onednn = pytest.mark.skipif(not linear_nll_module._probe_onednn(),
                                  reason="no oneDNN linear here (not x86-64, or a build without it)")


@pytest.fixture
def onednn(monkeypatch):
    """Set whether oneDNN serves float32 (restored after the test)."""
    def set_to(enabled: bool):
        monkeypatch.setattr(linear_nll_module, "_ONEDNN", enabled)
    return set_to


def inputs(n, d, vocab, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g, dtype=torch.float64)
    weight = torch.randn(vocab, d, generator=g, dtype=torch.float64) * 0.3
    bias = torch.randn(vocab, generator=g, dtype=torch.float64)
    target = torch.randint(0, vocab, (n,), generator=g)
    return [t.to(dtype).requires_grad_() for t in (hidden, weight, bias)], target


def nll_and_grads(fn, tensors, target):
    nll = fn(*tensors, target)
    upstream = torch.linspace(0.5, 2.0, nll.numel(), dtype=nll.dtype)           # a non-uniform grad_output
    return [nll.detach(), *torch.autograd.grad((nll * upstream).sum(), tensors)]


def assert_close(got, want):
    """Each float32 tensor of `got` equal to its counterpart in `want` (float64 or float32) up to float32 rounding."""
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert_rounding_close(g, w.to(g.dtype), f"output {i}")


def count_onednn(fn, monkeypatch):
    """fn()'s result and how many times it ran oneDNN's linear kernel (eagerly or from a compiled graph)."""
    calls = []
    kernel = getattr(torch.ops.mkldnn, "_linear_pointwise", None)     # None in a build without oneDNN

    def counted(*args):
        calls.append(args[0].shape)
        return kernel(*args)
    with monkeypatch.context() as patch:
        patch.setattr(torch.ops.mkldnn, "_linear_pointwise", counted, raising=False)
        out = fn()
    return out, len(calls)


@needs_onednn
@pytest.mark.parametrize("n", [3, 40])                  # few rows against many (a tail cluster), and more
def test_float32_linear_nll_runs_two_onednn_matmuls_and_matches_float64(n, onednn, monkeypatch):
    tensors, target = inputs(n, 24, 700)
    truth = nll_and_grads(lambda h, w, b, t: F.cross_entropy(F.linear(h, w, b), t, reduction="none"),
                          [x.detach().double().requires_grad_() for x in tensors], target)
    onednn(True)
    got, calls = count_onednn(lambda: nll_and_grads(linear_nll, tensors, target), monkeypatch)
    assert calls == 2                                   # the logits, and the gradient of the input
    assert_close(got, truth)
    onednn(False)
    blas, calls = count_onednn(lambda: nll_and_grads(linear_nll, tensors, target), monkeypatch)
    assert calls == 0
    assert_close(blas, truth)
    assert_close(got, blas)


@pytest.mark.parametrize("dtype,autocast", [(torch.float64, False), (torch.float32, True)])
def test_float64_and_bf16_autocast_keep_their_own_matmuls(dtype, autocast, onednn, monkeypatch):
    onednn(True)
    tensors, target = inputs(5, 8, 60, dtype=dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        _, calls = count_onednn(lambda: nll_and_grads(linear_nll, tensors, target), monkeypatch)
    assert calls == 0


def test_without_the_kernel_the_probe_says_no_and_the_loss_uses_the_blas(monkeypatch):
    def missing(*args, **kwargs):
        raise RuntimeError("no oneDNN in this build")
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", missing, raising=False)
    monkeypatch.setattr(linear_nll_module, "_ONEDNN", None)
    assert linear_nll_module.onednn_applies(torch.device("cpu"), torch.float32) is False     # probed once
    tensors, target = inputs(4, 8, 60)
    got, calls = count_onednn(lambda: nll_and_grads(linear_nll, tensors, target), monkeypatch)
    assert calls == 0 and linear_nll_module._ONEDNN is False
    truth = nll_and_grads(lambda h, w, b, t: F.cross_entropy(F.linear(h, w, b), t, reduction="none"),
                          [x.detach().double().requires_grad_() for x in tensors], target)
    assert_close(got, truth)


@needs_onednn
def test_the_tied_adaptive_softmax_in_float32_through_onednn_matches_float64(onednn, monkeypatch):
    """Head and three tails (one without targets: its matmuls have no rows) of a shared table: 2 oneDNN matmuls
    per cluster."""
    cutoffs, vocab, d = [50, 200, 900], 1000, 16
    g = torch.Generator().manual_seed(3)
    table = torch.randn(vocab, d, generator=g, dtype=torch.float64) * 0.3
    bias = torch.randn(vocab, generator=g, dtype=torch.float64) * 0.1
    extra_w = torch.randn(3, d, generator=g, dtype=torch.float64) * 0.3
    extra_b = torch.zeros(3, dtype=torch.float64)
    hidden = torch.randn(64, d, generator=g, dtype=torch.float64)
    target = torch.cat([torch.randint(0, 50, (50,), generator=g), torch.randint(50, 200, (10,), generator=g),
                        torch.randint(200, 900, (4,), generator=g)])             # no target in the last tail

    def run(dtype):
        params = [t.to(dtype).requires_grad_() for t in (table, bias, extra_w, extra_b, hidden)]
        nll = shared_table_adaptive_nll(params[4], target, *params[:4], [None] * 4, cutoffs, None)
        return [nll.detach(), *torch.autograd.grad(nll.sum(), params)]

    truth = run(torch.float64)
    onednn(True)
    got, calls = count_onednn(lambda: run(torch.float32), monkeypatch)
    assert calls == 2 * 4
    assert_close(got, truth)
    onednn(False)
    assert_close(run(torch.float32), truth)


@needs_onednn
def test_compiled_linear_nll_calls_onednn_from_its_graphs_and_matches_eager(onednn):
    from torch._inductor.utils import run_and_get_code
    onednn(True)
    tensors, target = inputs(6, 16, 300)
    eager = nll_and_grads(linear_nll, tensors, target)
    torch._dynamo.reset()
    compiled_fn = torch.compile(linear_nll, fullgraph=True, dynamic=False)
    compiled, codes = run_and_get_code(lambda: nll_and_grads(compiled_fn, tensors, target))
    # opaque to inductor: the forward graph calls it for the logits, the backward graph for the input gradient
    assert sum(code.count("torch.ops.txl.onednn_linear.default(") for code in codes) == 2
    assert_close(compiled, eager)


def test_the_probe_leaves_the_global_random_generator_alone(monkeypatch):
    """It runs at the first float32 loss of a process, e.g. the first step after a resume: drawing from the
    global generator there would change every later dropout mask (exact resume)."""
    monkeypatch.setattr(linear_nll_module, "_ONEDNN", None)
    torch.manual_seed(5)
    state = torch.get_rng_state()
    linear_nll_module.onednn_applies(torch.device("cpu"), torch.float32)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.slow
@needs_onednn
def test_a_fresh_process_compiles_the_loss_whole_at_its_first_call():
    """The probe runs at import, not at the first loss: a first loss traced by torch.compile (a compiled
    step before any eager one) would otherwise trace the probe and break the graph."""
    script = textwrap.dedent("""
        import torch
        import utils.model.linear_nll as m
        g = torch.Generator().manual_seed(0)
        h, w, b = (torch.randn(*s, generator=g).requires_grad_() for s in ((6, 16), (300, 16), (300,)))
        t = torch.randint(0, 300, (6,), generator=g)
        nll = torch.compile(m.linear_nll, fullgraph=True, dynamic=False)(h, w, b, t)
        nll.sum().backward()
        assert m._ONEDNN is True, m._ONEDNN
        print("compiled whole")
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[1],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "compiled whole" in result.stdout
