"""Memory: segments with mems against one pass, ext_len, the update rule, no in-place changes, incremental
next-token log-probabilities against full recomputation."""
import pytest
import torch

from model_testlib import tiny_model, tokens

pytestmark = pytest.mark.usefixtures("attn_impl")      # every test for each attention implementation

L = 6          # segment length


def one_pass_vs_two_segments(model, data, ext_len, mem_len):
    """Second-segment NLL: (one pass over both segments, two segments carrying mems)."""
    model.reset_length(2 * L, 0, mem_len)
    full, _ = model(data[:2 * L], data[1:2 * L + 1], None)
    model.reset_length(L, ext_len, mem_len)
    _, mems = model(data[:L], data[1:L + 1], model.init_mems(data.size(1)))
    assert mems.shape == (model.n_layer, L - ext_len, data.size(1), model.d_model)
    second, _ = model(data[L - ext_len:2 * L], data[L + 1:2 * L + 1], mems)
    assert second.shape == (L, data.size(1))
    return full[L:], second


# Types 2 and 3 give positions relative to the window, so a token's hidden states in layers >= 1 depend on
# the window it was computed in: only a one-layer model can equal a single pass (its memory is position-free).
@pytest.mark.parametrize("attn_type,n_layer", [(0, 3), (1, 3), (2, 1), (3, 1)])
@pytest.mark.parametrize("ext_len", [0, 2])
@pytest.mark.parametrize("pre_lnorm", [False, True])
def test_two_segments_with_memory_equal_one_pass(attn_type, n_layer, ext_len, pre_lnorm):
    mem_len = L - ext_len                      # memory + extended context = the whole first segment
    model = tiny_model(attn_type, n_layer=n_layer, tgt_len=L, ext_len=ext_len, mem_len=mem_len,
                       pre_lnorm=pre_lnorm, clamp_len=4 if attn_type == 1 else -1)
    assert model.max_klen >= 2 * L             # the learned tables cover the one pass
    full, second = one_pass_vs_two_segments(model, tokens(2 * L + 1, 3, 40), ext_len, mem_len)
    assert (full - second).abs().max().item() <= 1e-10


@pytest.mark.parametrize("attn_type", [0, 1, 2, 3])
def test_memory_is_never_modified_in_place(attn_type):
    model = tiny_model(attn_type, n_layer=3, tgt_len=L, mem_len=L)
    data = tokens(3 * L + 1, 2, 40)
    _, mems = model(data[:L], data[1:L + 1], None)
    kept = mems.clone()
    _, new_mems = model(data[L:2 * L], data[L + 1:2 * L + 1], mems)
    assert torch.equal(mems, kept)
    _, again = model(data[L:2 * L], data[L + 1:2 * L + 1], mems)   # same input, same memory -> same result
    assert torch.equal(new_mems, again)
    assert not new_mems.requires_grad


def test_memory_holds_each_layers_input():
    model = tiny_model(0, n_layer=2, tgt_len=L, mem_len=L)
    captured = []
    hooks = [layer.register_forward_pre_hook(lambda mod, args: captured.append(args[0].clone()))
             for layer in model.layers]
    data = tokens(L + 1, 2, 40)
    _, mems = model(data[:L], data[1:L + 1], None)
    for h in hooks:
        h.remove()
    assert torch.equal(mems, torch.stack(captured))


@pytest.mark.parametrize("qlen,ext_len,mem_len", [(1, 0, 4), (3, 0, 4), (4, 0, 4), (6, 0, 4), (5, 2, 4), (6, 2, 8)])
def test_memory_keeps_the_last_mem_len_positions_before_the_extended_context(qlen, ext_len, mem_len):
    """Each step feeds stream[s : s+qlen]; its last ext_len tokens are fed again next step, so the memory
    must hold the positions [s + tgt - mem_len, s + tgt). Layer 0's input is the word embedding."""
    tgt = qlen - ext_len
    model = tiny_model(0, n_layer=2, tgt_len=tgt, ext_len=ext_len, mem_len=mem_len)
    stream = tokens(40, 2, 40)
    mems = None
    for s in range(0, 5 * tgt, tgt):
        _, mems = model(stream[s:s + qlen], stream[s + ext_len + 1:s + qlen + 1], mems)
        cached = stream[max(0, s + tgt - mem_len):s + tgt]
        assert mems.shape == (2, cached.size(0), 2, model.d_model)
        assert torch.allclose(mems[0], model.word_emb(cached), rtol=0, atol=1e-12)


def test_mem_len_zero_gives_no_memory():
    model = tiny_model(0, mem_len=0)
    data = tokens(L + 1, 2, 40)
    assert model.init_mems(2) is None
    nll, mems = model(data[:L], data[1:], None)
    assert mems is None and nll.shape == (L, 2)


@pytest.mark.parametrize("attn_type", [0, 1])
@pytest.mark.parametrize("same_length", [True, False])
@pytest.mark.parametrize("clamp_len", [-1, 3])
def test_incremental_next_token_logprobs_equal_full_recomputation(attn_type, same_length, clamp_len):
    """One token at a time carrying mems (each token sees itself and the mem_len tokens before it) equals
    recomputing the whole prefix in one pass with the same visible context (same_length masking)."""
    mem_len, steps = 4, 9
    model = tiny_model(attn_type, n_layer=2, tgt_len=1, mem_len=mem_len, same_length=same_length,
                       clamp_len=clamp_len)
    data = tokens(steps, 2, 40)
    mems = model.init_mems(2)
    for t in range(steps):
        step_lp, mems = model.next_token_logprobs(data[t:t + 1], mems)
        assert step_lp.shape == (2, 40) and mems.size(1) == min(t + 1, mem_len)
        model.same_length = True
        full_lp, _ = model.next_token_logprobs(data[:t + 1], None)
        model.same_length = same_length
        assert (step_lp - full_lp).abs().max().item() <= 1e-10, t


def test_next_token_logprobs_and_forward_agree():
    model = tiny_model(0, cutoffs=[10, 25], div_val=2, tgt_len=L, mem_len=L)
    data = tokens(2 * L + 1, 3, 40)
    _, mems = model(data[:L], data[1:L + 1], None)
    nll, new_mems = model(data[L:2 * L], data[L + 1:2 * L + 1], mems)
    logp, lp_mems = model.next_token_logprobs(data[L:2 * L], mems)
    assert torch.equal(new_mems, lp_mems)
    assert torch.allclose(-logp.gather(1, data[2 * L].unsqueeze(1)).squeeze(1), nll[-1], rtol=0, atol=1e-12)
