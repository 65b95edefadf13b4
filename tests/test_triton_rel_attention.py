"""The fused relative-attention Triton kernel (attn_impl 'triton', utils/model/triton_rel_attention.py) computes
what the math path computes, forward and backward, run on the CPU by Triton's interpreter (TRITON_INTERPRET=1,
set by conftest.py).

Truth: the explicit matmuls + rel_shift + masked softmax of mem_transformer.py (`attention`,
`rel_position_scores`), in float64. Skipped where the triton package is not installed."""
import pytest
import torch

from model_testlib import tiny_model, tokens
from numerics import assert_rounding_close

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def triton_attention():
    """The kernel module (conftest.py sets TRITON_INTERPRET=1 on machines without a GPU)."""
    import utils.model.triton_rel_attention as module
    if not module.runs_on(torch.device("cpu")):
        pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1 set before triton is imported")
    return module


def math_relative_attention(q, k, v, r, r_w_bias, r_r_bias, band, scale):
    """MultiHeadAttn's type-0 math path: AC + rel_shift(BD), masked outside the band, softmax, · v."""
    from mem_transformer import attention, rel_position_scores
    qlen, klen = q.size(2), k.size(2)
    offset = torch.arange(klen)[None, :] - torch.arange(qlen)[:, None]         # j - i
    mask = ~((offset > band[0]) & (offset <= band[1]))
    pos = rel_position_scores((q + r_r_bias.unsqueeze(1)) * scale, r, None)
    return attention((q + r_w_bias.unsqueeze(1)) * scale, k, v, pos, mask, 0.0, False)


# (qlen, mlen, band): no memory; memory; same_length's narrower band; a query tile not filled (qlen 20)
CASES = {"no_memory": (17, 0, (-17, 0)), "memory": (20, 12, (-32, 12)), "same_length": (20, 12, (-13, 12)),
         "short": (5, 4, (-9, 4))}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", CASES)
def test_kernel_forward_and_backward_equal_the_math_path(triton_attention, case, dtype):
    qlen, mlen, band = CASES[case]
    bsz, n_head, d_head, klen = 2, 2, 12, qlen + mlen                           # d_head 12: a padded tile width
    scale = d_head ** -0.5
    g = torch.Generator().manual_seed(3)
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=dtype).requires_grad_()   # noqa: E731
    q, k, v = rand(bsz, n_head, qlen, d_head), rand(bsz, n_head, klen, d_head), rand(bsz, n_head, klen, d_head)
    r, r_w_bias, r_r_bias = rand(klen, n_head, d_head), rand(n_head, d_head), rand(n_head, d_head)
    inputs = (q, k, v, r, r_w_bias, r_r_bias)
    grad_out = torch.randn(bsz, n_head, qlen, d_head, generator=g, dtype=dtype)

    expected = math_relative_attention(q, k, v, r, r_w_bias, r_r_bias, band, scale)
    expected_grads = torch.autograd.grad((expected * grad_out).sum(), inputs)
    out = triton_attention.relative_triton_attention(q + r_w_bias.unsqueeze(1), k, v,
                                                     (q + r_r_bias.unsqueeze(1)) * scale, r, band, scale)
    grads = torch.autograd.grad((out * grad_out).sum(), inputs)
    assert_rounding_close(out, expected, "output")
    for name, got, want in zip(("q", "k", "v", "r", "r_w_bias", "r_r_bias"), grads, expected_grads):
        assert_rounding_close(got, want, name)


@pytest.mark.parametrize("same_length", [False, True])
def test_model_with_memory_and_clamp_len_gives_the_math_loss_and_gradients(triton_attention, same_length):
    results = []
    for impl in ("math", "triton"):
        model = tiny_model(0, n_layer=2, tgt_len=5, mem_len=7, clamp_len=4, same_length=same_length).train()
        model.set_attn_impl(impl)
        data = tokens(11, 3, 40)
        _, mems = model(data[:5], data[1:6], None)                             # memory-less first segment
        nll, new_mems = model(data[5:10], data[6:11], mems)                    # a segment with memory
        names = [n for n, p in model.named_parameters()]
        grads = torch.autograd.grad(nll.sum(), list(model.parameters()), allow_unused=True)
        results.append((nll, new_mems, dict(zip(names, grads))))
    (nll_math, mems_math, g_math), (nll_tri, mems_tri, g_tri) = results
    assert_rounding_close(nll_tri, nll_math, "nll")
    assert_rounding_close(mems_tri, mems_math, "mems")
    for name in ("r_w_bias", "r_r_bias", "layers.0.attn.r_net.weight", "layers.0.attn.qkv_net.weight",
                 "word_emb.emb_layers.0.weight"):
        assert g_tri[name] is not None and g_tri[name].abs().max() > 0, name     # the terms are all exercised
    for name in g_math:
        if g_math[name] is not None:
            assert_rounding_close(g_tri[name], g_math[name], name)


def test_the_kernel_serves_eval_and_dropatt_0_and_attention_dropout_falls_back_to_sdpa(triton_attention,
                                                                                        monkeypatch):
    kernel = triton_attention.relative_triton_attention
    calls = []
    monkeypatch.setattr(triton_attention, "relative_triton_attention", lambda *a: calls.append(1) or kernel(*a))
    model = tiny_model(0, dropatt=0.1).train()
    model.set_attn_impl("triton")
    data = tokens(7, 2, 40)
    model(data[:6], data[1:7], None)
    assert calls == []                                                          # dropout: sdpa
    model.eval()
    model(data[:6], data[1:7], None)
    assert calls == [1, 1]                                                      # one call per layer


def test_the_kernel_compiles_in_one_graph_and_gives_the_eager_loss_and_gradients(triton_attention):
    """The kernels are custom operators: torch.compile (fullgraph, aot_eager here) keeps them as calls,
    forward and backward, without a graph break."""
    import torch._dynamo
    torch._dynamo.reset()
    results = []
    for compiled in (False, True):
        model = tiny_model(0, tgt_len=5, mem_len=7).train()
        model.set_attn_impl("triton")
        data = tokens(11, 3, 40)
        run = torch.compile(model, backend="aot_eager", fullgraph=True) if compiled else model
        _, mems = run(data[:5], data[1:6], None)
        nll, _ = run(data[5:10], data[6:11], mems)
        results.append((nll, torch.autograd.grad(nll.sum(), list(model.parameters()))))
    (nll_eager, g_eager), (nll_compiled, g_compiled) = results
    assert_rounding_close(nll_compiled, nll_eager, "nll")
    for got, want in zip(g_compiled, g_eager):
        assert_rounding_close(got, want, "gradient")
    torch._dynamo.reset()


def test_the_cpu_without_the_interpreter_is_refused_before_training(triton_attention, monkeypatch):
    from utils.config.cli import parse_args, train_parser
    from utils.io.errors import UserError
    from utils.runtime.device import resolve_speed_flags
    args = parse_args(train_parser(), ["--data", "x", "--attn_impl", "triton"], section="train")
    assert resolve_speed_flags(args, torch.device("cpu")).attn_impl == "triton"      # interpreter set
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(UserError, match="triton needs the triton package and a GPU"):
        resolve_speed_flags(args, torch.device("cpu"))
