"""The speed paths compute what the plain paths compute, gradients included: the fused output-layer loss
against autograd's log-softmax, the attention implementations against each other, activation checkpointing
against keeping the activations, FlexAttention (compiled) against the explicit matmuls."""
import shutil

import pytest
import torch

from model_testlib import tiny_model, tokens
from test_model_softmax import CONFIGS, N_TOKEN


def param_grads(model, loss):
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [p for _, p in model.named_parameters() if p.requires_grad],
                                allow_unused=True)
    return {n: g for n, g in zip(names, grads) if g is not None}


def assert_same_grads(a, b, tol):
    assert a.keys() == b.keys()
    for name in a:
        assert (a[name] - b[name]).abs().max().item() < tol, name


@pytest.mark.parametrize("name", CONFIGS)
def test_fused_output_layer_gradients_equal_autograd_log_softmax(name):
    model = tiny_model(0, n_token=N_TOKEN, **CONFIGS[name])
    data = tokens(9, 4, N_TOKEN, seed=7)
    weights = torch.linspace(0.2, 1.7, 8 * 4, dtype=torch.float64).view(8, 4)   # a non-uniform grad_output
    nll, _ = model(data[:8], data[1:9], None)
    fused = param_grads(model, (nll * weights).sum())
    hidden, _ = model(data[:8], None, None)
    logp = model.crit.log_probs(hidden.reshape(-1, model.d_model), model.word_emb.weights(), model.word_emb.projs())
    plain_nll = -logp.gather(1, data[1:9].reshape(-1, 1)).view(8, 4)
    plain = param_grads(model, (plain_nll * weights).sum())
    assert_same_grads(fused, plain, 1e-12)


@pytest.mark.parametrize("attn_type", [0, 1, 2, 3])
def test_attention_implementations_give_the_same_loss_and_gradients(attn_type):
    results = []
    for impl in ("math", "sdpa"):
        model = tiny_model(attn_type, tgt_len=5, mem_len=4, clamp_len=3 if attn_type == 0 else -1).train()
        model.set_attn_impl(impl)
        data = tokens(11, 3, 40)
        _, mems = model(data[:5], data[1:6], None)
        nll, _ = model(data[5:10], data[6:11], mems)                   # a segment with memory
        results.append((nll, param_grads(model, nll.sum())))
    (nll_math, g_math), (nll_sdpa, g_sdpa) = results
    assert (nll_math - nll_sdpa).abs().max().item() < 1e-12
    assert_same_grads(g_math, g_sdpa, 1e-11)


@pytest.mark.parametrize("attn_impl", ["math", "sdpa"])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(attn_impl):
    results = []
    for ckpt in (False, True):
        model = tiny_model(0, n_layer=3, tgt_len=5, mem_len=5, dropout=0.3, dropatt=0.2).train()
        model.set_attn_impl(attn_impl)
        model.set_checkpoint_activations(ckpt)
        data = tokens(11, 2, 40)
        torch.manual_seed(5)                                         # same dropout masks in both runs
        _, mems = model(data[:5], data[1:6], None)
        nll, new_mems = model(data[5:10], data[6:11], mems)
        results.append((nll, new_mems, param_grads(model, nll.sum())))
    (nll_a, mems_a, g_a), (nll_b, mems_b, g_b) = results
    assert torch.equal(nll_a, nll_b) and torch.equal(mems_a, mems_b)
    assert_same_grads(g_a, g_b, 1e-12)


def test_an_unknown_attention_implementation_is_refused():
    from utils.io.errors import UserError
    with pytest.raises(UserError, match="attention implementation"):
        tiny_model(0).set_attn_impl("fused")


@pytest.mark.slow
def test_flex_attention_under_compile_computes_what_the_matmuls_compute():
    """Forward only: PyTorch has no CPU backward for FlexAttention (its backward is exercised on GPUs)."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    if not any(shutil.which(cc) for cc in ("g++", "c++", "clang++")):
        pytest.skip("no C++ compiler on PATH: torch.compile's CPU backend (inductor) cannot build kernels")
    model = tiny_model(0, n_layer=1, d_model=32, d_head=16, dtype=torch.float32, tgt_len=6, mem_len=4,
                       clamp_len=3, same_length=True)                # the CPU kernel needs d_head >= 16
    data = tokens(13, 2, 40)
    with torch.no_grad():
        _, mems = model(data[:6], data[1:7], None)
        expected, expected_mems = model(data[6:12], data[7:13], mems)
        model.set_attn_impl("flex")
        nll, new_mems = torch.compile(model, dynamic=False)(data[6:12], data[7:13], mems)
    assert (nll - expected).abs().max().item() < 1e-4
    assert torch.equal(new_mems, expected_mems)
