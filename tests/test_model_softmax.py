"""Output layer: normalization, per-token NLL in token order, the adaptive softmax against the spec's formulas
written as loops, and the sampled softmax."""
import math

import pytest
import torch

from model_testlib import spec_log_probs, tiny_model, tokens
from utils.model.log_uniform_sampler import LogUniformSampler, sample_logits
from utils.model.init import init_weights

N_TOKEN = 40
CONFIGS = {                                           # d_model 16
    "full": dict(),
    "full-proj-tied": dict(d_embed=12),
    "full-proj-untied": dict(d_embed=12, tie_weight=False),
    "adaptive-div1-wt103-base-shape": dict(cutoffs=[10, 25], tie_projs=[False, True, True]),
    "adaptive-div1-tied": dict(cutoffs=[10, 25], d_embed=12, tie_projs=[False, True, True]),
    "adaptive-div1-untied": dict(cutoffs=[10, 25], d_embed=12, tie_weight=False, tie_projs=[False, True, False]),
    "adaptive-div4-tied": dict(cutoffs=[10, 25], div_val=4, d_embed=32, tie_projs=[False, True, True]),
    "adaptive-div4-untied": dict(cutoffs=[10, 25], div_val=4, d_embed=32, tie_weight=False, tie_projs=[False] * 3),
    "adaptive-div2-mixed": dict(cutoffs=[10, 25], div_val=2, d_embed=12, tie_projs=[True, False, True]),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_next_token_probabilities_sum_to_one(name):
    model = tiny_model(0, n_token=N_TOKEN, dtype=torch.float32, **CONFIGS[name])
    data = tokens(5, 3, N_TOKEN)
    _, mems = model(data[:4], data[1:5], None)
    logp, _ = model.next_token_logprobs(data[4:5], mems)
    assert logp.shape == (3, N_TOKEN) and logp.dtype == torch.float32
    assert (logp.exp().sum(1) - 1).abs().max().item() <= 1e-6


@pytest.mark.parametrize("name", CONFIGS)
def test_nll_is_minus_log_probability_of_the_target_at_its_own_position(name):
    model = tiny_model(0, n_token=N_TOKEN, **CONFIGS[name])
    data = tokens(7, 4, N_TOKEN, seed=5)
    nll, _ = model(data[:6], data[1:7], None)
    hidden, _ = model(data[:6], None, None)                      # [6, 4, d_model]
    logp = model.crit.log_probs(hidden.reshape(-1, model.d_model), model.word_emb.weights(), model.word_emb.projs())
    expected = -logp.gather(1, data[1:7].reshape(-1, 1)).view(6, 4)
    assert nll.shape == (6, 4)
    assert (nll - expected).abs().max().item() < 1e-12


def test_adaptive_softmax_div_val_2_tied_matches_the_spec():
    model = tiny_model(0, n_token=N_TOKEN, cutoffs=[10, 25], div_val=2, d_embed=12, tie_projs=[False, True, False])
    emb, crit = model.word_emb, model.crit
    bounds = [0, 10, 25, 40]
    weights = [layer.weight for layer in emb.emb_layers]                     # tied: the embedding tables
    biases = list(crit.out_layers_biases)
    projs = [crit.out_projs[0], emb.emb_projs[1], crit.out_projs[1]]         # untied, tied to emb, untied
    h = torch.randn(3, model.d_model, dtype=torch.float64)
    expected = spec_log_probs(h, bounds, weights, biases, projs, crit.cluster_weight, crit.cluster_bias)
    assert (crit.log_probs(h, emb.weights(), emb.projs()) - expected).abs().max().item() < 1e-12
    target = torch.tensor([3, 17, 33])
    nll = crit(h, target, emb.weights(), emb.projs())
    assert (nll + expected.gather(1, target[:, None]).squeeze(1)).abs().max().item() < 1e-12


def test_adaptive_softmax_div_val_1_untied_with_projections_matches_the_spec():
    model = tiny_model(0, n_token=N_TOKEN, cutoffs=[10, 25], d_embed=12, tie_weight=False,
                       tie_projs=[False, True, False])
    emb, crit = model.word_emb, model.crit
    bounds = [0, 10, 25, 40]
    w, b = crit.out_layers_weights[0], crit.out_layers_biases[0]             # one matrix over the vocabulary
    weights = [w[lo:hi] for lo, hi in zip(bounds, bounds[1:])]
    biases = [b[lo:hi] for lo, hi in zip(bounds, bounds[1:])]
    projs = [crit.out_projs[0], emb.emb_projs[0], crit.out_projs[1]]         # tied: the embedding's only one
    h = torch.randn(3, model.d_model, dtype=torch.float64)
    expected = spec_log_probs(h, bounds, weights, biases, projs, crit.cluster_weight, crit.cluster_bias)
    assert (crit.log_probs(h, emb.weights(), emb.projs()) - expected).abs().max().item() < 1e-12


def test_softmax_runs_in_float32_under_autocast():
    model = tiny_model(0, n_token=N_TOKEN, dtype=torch.float32, cutoffs=[10, 25], div_val=2)
    data = tokens(7, 2, N_TOKEN)
    ref, _ = model(data[:6], data[1:7], None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        nll, mems = model(data[:6], data[1:7], None)
        logp, _ = model.next_token_logprobs(data[:6], None)
    assert nll.dtype == torch.float32 and logp.dtype == torch.float32
    assert (nll - ref).abs().max().item() < 0.1


def test_log_uniform_sampler_distribution_and_expected_counts():
    n_token, n_sample = 100, 6
    sampler = LogUniformSampler(n_token, n_sample)
    for k in (0, 1, 50, 99):
        p = (math.log(k + 2) - math.log(k + 1)) / math.log(n_token + 1)
        assert abs(sampler.dist[k].item() - p) < 1e-7
        assert abs(sampler.log_q[k].item() - math.log(1 - (1 - p) ** (2 * n_sample))) < 1e-5
    labels = torch.tensor([[1, 2], [3, 4]])
    true_q, samp_q, samples = sampler.sample(labels)
    assert true_q.shape == labels.shape and samples.dim() == 1 and 0 < samples.numel() <= 2 * n_sample
    assert samples.unique().numel() == samples.numel() and 0 <= samples.min() and samples.max() < n_token
    assert torch.equal(samp_q, sampler.log_q[samples])


def test_sampled_logits_mask_accidental_hits_with_minus_infinity_in_float16():
    weight, bias = torch.randn(10, 4).half(), torch.randn(10).half()
    hidden, labels = torch.randn(2, 3, 4).half(), torch.tensor([[1, 2, 3], [4, 5, 6]])
    samples = torch.tensor([2, 7])
    logits = sample_logits(weight, bias, None, hidden, labels, torch.zeros(2, 3), torch.zeros(2), samples)
    assert logits.shape == (2, 3, 3)
    assert logits[0, 1, 1].item() == float("-inf")                        # label 2 was also sampled
    assert torch.isfinite(logits[..., 0]).all() and torch.isfinite(logits[..., 2]).all()
    assert torch.isfinite(-torch.log_softmax(logits.float(), -1)[..., 0]).all()
    expected_true = (weight[labels].float() * hidden.float()).sum(-1) + bias[labels].float()
    assert (logits[..., 0].float() - expected_true).abs().max().item() < 0.05


def test_sampled_softmax_trains_and_evaluates_with_the_exact_softmax():
    torch.manual_seed(0)
    n_token, tgt_len, bsz = 50, 8, 4
    from mem_transformer import MemTransformerLM
    model = MemTransformerLM(n_token, 1, 2, 16, 8, 32, 0.0, 0.0, tgt_len=tgt_len, mem_len=0, sample_softmax=8)
    init_weights(model, init_std=0.1)
    stream = (torch.arange(tgt_len * 40 + 1) * 7 % n_token).view(-1)         # a deterministic sequence
    data = torch.stack([stream.roll(-3 * b) for b in range(bsz)], 1)        # [len, bsz]

    def exact_loss():
        model.eval()
        with torch.no_grad():
            nll, _ = model(data[:tgt_len], data[1:tgt_len + 1], None)
            crit_nll = model.crit(model(data[:tgt_len], None, None)[0].view(-1, 16), data[1:tgt_len + 1].reshape(-1),
                                  model.word_emb.weights(), model.word_emb.projs())
        assert torch.equal(nll.view(-1), crit_nll)                        # eval: the exact softmax
        return nll.mean().item()

    before = exact_loss()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for step in range(40):
        i = (step * tgt_len) % (data.size(0) - tgt_len - 1)
        loss, _ = model(data[i:i + tgt_len], data[i + 1:i + tgt_len + 1], None)
        assert loss.shape == (tgt_len, bsz) and torch.isfinite(loss).all()
        opt.zero_grad()
        loss.mean().backward()
        opt.step()
    after = exact_loss()
    assert after < 0.6 * before, (before, after)          # uniform guessing is log(50) = 3.9
