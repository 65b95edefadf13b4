"""The adaptive softmax's clusters converted to float32 together (utils/model/linear_nll.py: grouped_lse,
grouped_grad_logits_): against the full log-softmax in float64 for every grouping and layout; in bf16 the
same bits as one cluster at a time, with one conversion per group instead of one per cluster."""
import copy

import pytest
import torch

import utils.model.linear_nll as linear_nll_module
from utils.model.adaptive_softmax import ProjectedAdaptiveLogSoftmax
from utils.runtime.step_report import OpCounter

N_TOKEN, CUTOFFS, D = 300, [40, 100, 200], 16


def crit_table(dtype):
    torch.manual_seed(0)
    crit = ProjectedAdaptiveLogSoftmax(N_TOKEN, D, D, CUTOFFS, div_val=1, tie_weight=True).to(dtype)
    with torch.no_grad():
        for p in crit.parameters():
            p.copy_(torch.randn_like(p))
    return crit, torch.nn.Parameter(torch.randn(N_TOKEN, D, dtype=dtype))


def batch(dtype):
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(40, D, dtype=dtype, generator=g) * 2
    # head, tail clusters 1 and 2; tail cluster 3 without tokens (as in a small batch of WikiText-103)
    target = torch.cat([torch.randint(0, 40, (28,), generator=g), torch.randint(40, 100, (6,), generator=g),
                        torch.randint(100, 200, (6,), generator=g)])
    return hidden, target[torch.randperm(40, generator=g)]


def loss_and_grads(crit, table, hidden, target, reference=False, autocast=False):
    params = [table] + list(crit.parameters())
    for p in params:
        p.grad = None
    h = hidden.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), OpCounter() as counter:
        if reference:
            nll = -crit.log_probs(h, [table], []).gather(1, target.unsqueeze(1)).squeeze(1)
        else:
            nll = crit(h, target, [table], [])
        weights = torch.linspace(0.5, 1.5, nll.numel(), dtype=nll.dtype)       # a non-uniform upstream gradient
        (nll * weights).sum().backward()
    return nll.detach(), [h.grad] + [p.grad for p in params], counter.casts


def one_by_one(monkeypatch):
    monkeypatch.setattr(linear_nll_module, "_float_groups", lambda sizes, device: [[i] for i in range(len(sizes))])


@pytest.mark.parametrize("few_rows", [False, True])                 # tails as [V, N] transposed, or all [N, V]
@pytest.mark.parametrize("block_elements", [None, 700, 50])         # one group; head alone; row blocks
def test_grouped_clusters_equal_the_full_log_softmax_in_float64(block_elements, few_rows, monkeypatch):
    if block_elements is not None:
        monkeypatch.setitem(linear_nll_module._BLOCK_ELEMENTS, "cpu", block_elements)
    monkeypatch.setattr(linear_nll_module, "_FEW_ROWS", 2 if few_rows else 1 << 30)
    crit, table = crit_table(torch.float64)
    hidden, target = batch(torch.float64)
    nll, grads, _ = loss_and_grads(crit, table, hidden, target)
    ref_nll, ref_grads, _ = loss_and_grads(crit, table, hidden, target, reference=True)
    torch.testing.assert_close(nll, ref_nll, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("few_rows", [False, True])
def test_bf16_grouped_conversion_gives_the_bits_of_one_cluster_at_a_time_with_fewer_casts(few_rows, monkeypatch):
    """Under bf16 autocast the logits are bf16 and their log-sum-exp / softmax float32: converting all clusters
    at once (one conversion forward, one each way backward) must give exactly the per-cluster values."""
    monkeypatch.setattr(linear_nll_module, "_FEW_ROWS", 2 if few_rows else 1 << 30)
    crit, table = crit_table(torch.float32)
    hidden, target = batch(torch.float32)
    grouped = loss_and_grads(crit, table, hidden, target, autocast=True)
    one_by_one(monkeypatch)
    alone = loss_and_grads(crit, table, hidden, target, autocast=True)
    assert grouped[0].dtype == torch.float32
    assert torch.equal(grouped[0], alone[0])
    assert all(torch.equal(a, b) for a, b in zip(grouped[1], alone[1]))
    # 3 clusters with tokens: 3 conversions forward and 3 + 3 backward become 1 + 2
    assert alone[2] - grouped[2] == 6
    # and the values are bf16 logits' (relative error of the NLL against float64 at bf16's rounding)
    crit64, table64 = copy.deepcopy(crit).double(), torch.nn.Parameter(table.detach().double())
    ref = loss_and_grads(crit64, table64, hidden.double(), target, reference=True)[0]
    assert ((grouped[0].double() - ref).abs() / ref.abs()).max() < 2 ** -6
