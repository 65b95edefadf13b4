"""Attention: the relative-position term, whole attention layers against explicit float64 loops, causality,
and what same_length lets each query see."""
import math

import pytest
import torch
import torch.nn.functional as F

from mem_transformer import last_rows, rel_position_scores
from model_testlib import sinusoid, tiny_model, tokens
from numerics import assert_rounding_close, moved_beyond_rounding

pytestmark = pytest.mark.usefixtures("attn_impl")      # every test for each attention implementation


@pytest.mark.parametrize("qlen,mlen", [(3, 4), (5, 0)])        # qlen < klen, qlen == klen
@pytest.mark.parametrize("clamp_len", [-1, 2])
def test_relative_position_term_is_the_embedding_of_distance_mlen_plus_i_minus_j(qlen, mlen, clamp_len):
    d_model, n_head, d_head, bsz = 8, 2, 3, 2
    model = tiny_model(d_model=d_model, n_head=n_head, d_head=d_head, clamp_len=clamp_len)
    klen = mlen + qlen
    torch.manual_seed(3)
    w_r = torch.randn(n_head * d_head, d_model, dtype=torch.float64)              # an r_net
    q = torch.randn(bsz, n_head, qlen, d_head, dtype=torch.float64)
    pos = model._sinusoid_of_distances(klen, q)                                   # [klen, d_model]
    out = rel_position_scores(q, (pos @ w_r.t()).view(klen, n_head, d_head), None)

    for b in range(bsz):
        for h in range(n_head):
            for i in range(qlen):
                for j in range(mlen + i + 1):                                     # every visible key
                    dist = mlen + i - j
                    if clamp_len > 0:
                        dist = min(dist, clamp_len)
                    r = w_r @ torch.tensor(sinusoid(dist, d_model), dtype=torch.float64)
                    expected = torch.dot(q[b, h, i], r.view(n_head, d_head)[h])
                    assert abs(out[b, h, i, j].item() - expected.item()) < 1e-12, (b, h, i, j)


def naive_attention_layer(attn, attn_type, h, mem, mask, r, r_w_bias, r_bias, clamp_len=-1):
    """One attention sub-layer written as loops over (batch, head, query, key), float64."""
    qlen, bsz, d_model = h.shape
    mlen = 0 if mem is None else mem.size(0)
    n_head, d_head = attn.n_head, attn.d_head
    cat = h if mem is None else torch.cat([mem, h])
    x = F.layer_norm(cat, (d_model,), attn.layer_norm.weight, attn.layer_norm.bias) if attn.pre_lnorm else cat
    w_q, w_k, w_v = attn.qkv_net.weight.chunk(3, 0)
    vec = torch.zeros(qlen, bsz, n_head * d_head, dtype=h.dtype)
    for b in range(bsz):
        for n in range(n_head):
            rows = slice(n * d_head, (n + 1) * d_head)
            for i in range(qlen):
                q = w_q[rows] @ x[mlen + i, b]
                keys, scores = [], []
                for j in range(mlen + qlen):
                    if mask[i, j]:
                        continue
                    k = w_k[rows] @ x[j, b]
                    dist = mlen + i - j
                    if attn_type == 0:
                        pos = torch.tensor(sinusoid(min(dist, clamp_len) if clamp_len > 0 else dist, d_model),
                                           dtype=h.dtype)
                        s = torch.dot(q + r_w_bias[n], k) + torch.dot(q + r_bias[n], attn.r_net.weight[rows] @ pos)
                    elif attn_type == 1:
                        row = max(0, r.size(0) - 1 - dist)                        # table row of this distance
                        s = torch.dot(q + r_w_bias[n], k) + torch.dot(q, r[row, n]) + r_bias[row, n]
                    else:
                        s = torch.dot(q, k)
                    keys.append(j)
                    scores.append(s / math.sqrt(d_head))
                prob = torch.softmax(torch.stack(scores), 0)
                vec[i, b, rows] = sum(p * (w_v[rows] @ x[j, b]) for p, j in zip(prob, keys))
    out = h + vec @ attn.o_net.weight.t()
    return out if attn.pre_lnorm else F.layer_norm(out, (d_model,), attn.layer_norm.weight, attn.layer_norm.bias)


@pytest.mark.parametrize("attn_type", [0, 1, 2, 3])
@pytest.mark.parametrize("pre_lnorm", [False, True])
@pytest.mark.parametrize("mlen", [0, 2])
def test_attention_layer_matches_explicit_loops(attn_type, pre_lnorm, mlen):
    d_model, n_head, d_head, qlen, bsz = 8, 2, 4, 3, 2
    clamp_len = 3 if attn_type == 0 else -1
    model = tiny_model(attn_type, d_model=d_model, n_head=n_head, d_head=d_head, pre_lnorm=pre_lnorm,
                       clamp_len=clamp_len, mem_len=2)
    attn = model.layers[0].attn
    torch.manual_seed(4)
    h = torch.randn(qlen, bsz, d_model, dtype=torch.float64)
    mem = torch.randn(mlen, bsz, d_model, dtype=torch.float64) if mlen else None
    klen = mlen + qlen
    mask = torch.triu(torch.ones(qlen, klen, dtype=torch.bool), 1 + mlen)
    mask[2, 0] = True                                                    # a same_length-style extra hidden key
    none = torch.empty(0, dtype=torch.float64)
    if attn_type == 0:
        args = (model._sinusoid_of_distances(klen, h), model.r_w_bias, model.r_r_bias)
    elif attn_type == 1:
        table_len = 4 if mlen else 2                                     # shorter than klen: padded with row 0
        args = (torch.randn(table_len, n_head, d_head, dtype=torch.float64), model.r_w_bias[0],
                torch.randn(table_len, n_head, dtype=torch.float64))
    else:
        args = (none, none, none)
    out = attn(h, mem, mask, *args)
    expected = naive_attention_layer(attn, attn_type, h, mem, mask, *args, clamp_len=clamp_len)
    assert (out - expected).abs().max().item() < 1e-12


def test_last_rows_pads_with_the_first_row():
    table = torch.arange(6.0).view(3, 2)
    assert torch.equal(last_rows(table, 2), table[1:])
    assert torch.equal(last_rows(table, 5), torch.cat([table[:1], table[:1], table]))


@pytest.mark.parametrize("attn_type", [0, 1, 2, 3])
@pytest.mark.parametrize("adaptive", [False, True])
def test_changing_a_token_changes_no_earlier_nll(attn_type, adaptive):
    kw = dict(cutoffs=[10, 25], div_val=2, tie_projs=[False, True, False]) if adaptive else {}
    model = tiny_model(attn_type, tgt_len=8, mem_len=4, **kw)
    data = tokens(9, 3, 40)
    mems = model.init_mems(3)
    _, mems = model(data[:4], data[1:5], mems)                          # some memory first
    base, _ = model(data[:8], data[1:9], mems)
    for t in range(8):
        changed = data.clone()
        changed[t, 1] = (changed[t, 1] + 7) % 40
        nll, _ = model(changed[:8], data[1:9], mems)
        # Other inputs than `base`: the products that computed the untouched entries had other rows, which
        # BLAS may round differently (seen: 1.8e-15 on an AMD EPYC, adaptive softmax), so "untouched" is
        # "equal up to float64 rounding"; a leak through the mask or across rows would move them by >1e-4.
        assert_rounding_close(nll[:t], base[:t], f"t={t}: before t")        # nothing before t moves
        assert moved_beyond_rounding(nll[t:, 1], base[t:, 1]), t            # the change is seen from t on
        assert_rounding_close(nll[:, [0, 2]], base[:, [0, 2]], f"t={t}: other sequences")  # untouched


@pytest.mark.parametrize("qlen", [5, 1])
def test_same_length_mask_shows_every_query_mem_len_plus_one_keys(qlen):
    mem_len = 4
    model = tiny_model(same_length=True, mem_len=mem_len, tgt_len=qlen)
    mask = model._attn_mask(qlen, mem_len, torch.device("cpu"))          # memory full: mlen == mem_len
    for i in range(qlen):
        visible = (~mask[i]).nonzero().squeeze(1).tolist()
        assert visible == list(range(i, mem_len + i + 1))               # the mem_len keys before it and itself
    plain = tiny_model(mem_len=mem_len, tgt_len=qlen)._attn_mask(qlen, mem_len, torch.device("cpu"))
    assert [(~row).sum().item() for row in plain] == [mem_len + i + 1 for i in range(qlen)]


def test_same_length_outputs_depend_on_exactly_mem_len_plus_one_tokens():
    """Behaviour, not the mask: perturbing one memory slot moves exactly the queries that may see it
    (one layer: with more, a query also sees a slot through the earlier queries of its segment)."""
    mem_len, qlen = 4, 5
    model = tiny_model(same_length=True, mem_len=mem_len, tgt_len=qlen, n_layer=1)
    data = tokens(3 * qlen + 1, 2, 40)
    mems = None
    for s in range(2):                                                   # fill the memory
        _, mems = model(data[s * qlen:(s + 1) * qlen], data[s * qlen + 1:(s + 1) * qlen + 1], mems)
    assert mems.size(1) == mem_len
    seg, tgt = data[2 * qlen:3 * qlen], data[2 * qlen + 1:3 * qlen + 1]
    base, _ = model(seg, tgt, mems)
    for slot in range(mem_len):
        bumped = mems.clone()
        bumped[:, slot] += 1.0
        nll, _ = model(seg, tgt, bumped)
        moved = [(nll[i] - base[i]).abs().max().item() > 1e-12 for i in range(qlen)]
        # query i sees keys i .. mem_len + i, i.e. memory slots >= i
        assert moved == [slot >= i for i in range(qlen)], slot
