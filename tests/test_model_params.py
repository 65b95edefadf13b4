"""Parameter counts of the WikiText-103 presets, the reference's initialization rules, state dicts with tied
weights, and the settings methods."""
import io

import pytest
import torch
from torch import nn

from mem_transformer import MemTransformerLM
from model_testlib import tiny_model, tokens
from utils.io.errors import UserError
from utils.model.init import count_parameters, init_weights

WT103 = dict(n_token=267735, cutoffs=[19997, 39997, 199997], tie_weight=True, dropout=0.1, dropatt=0.0,
             tgt_len=192, ext_len=0, mem_len=192, tie_projs=[False, True, True, True])


def test_parameter_counts_of_the_wt103_base_preset():
    with torch.device("meta"):
        model = MemTransformerLM(n_layer=16, n_head=8, d_model=512, d_head=64, d_inner=2048, div_val=1, **WT103)
    assert count_parameters(model) == (191_950_298, 54_599_680)


def test_parameter_counts_of_the_wt103_large_preset():
    with torch.device("meta"):
        model = MemTransformerLM(n_layer=18, n_head=16, d_model=1024, d_head=64, d_inner=4096, div_val=4, **WT103)
    assert count_parameters(model) == (285_167_482, 245_532_672)


def test_initialization_follows_the_reference_rules():
    torch.manual_seed(0)
    model = MemTransformerLM(300, 4, 4, 128, 32, 256, 0.1, 0.0, tgt_len=8, mem_len=8, attn_type=1, cutoffs=[100, 200],
                             div_val=2, tie_weight=False, tie_projs=[False, True, False])
    init_weights(model, init_std=0.05, proj_init_std=0.01)
    layer_norm = torch.cat([m.weight for m in model.modules() if isinstance(m, nn.LayerNorm)])
    assert abs(layer_norm.mean().item() - 1.0) < 0.01 and abs(layer_norm.std().item() - 0.05) < 0.005
    zeros = [m.bias for m in model.modules() if isinstance(m, (nn.Linear, nn.LayerNorm)) and m.bias is not None]
    zeros += [model.r_bias, model.crit.cluster_bias, *model.crit.out_layers_biases]
    assert all(torch.count_nonzero(z) == 0 for z in zeros)
    for group, std in [([m.weight for m in model.modules() if isinstance(m, nn.Linear)], 0.05),
                       ([l.weight for l in model.word_emb.emb_layers], 0.05),
                       ([*model.crit.out_layers_weights, model.crit.cluster_weight], 0.05),
                       ([model.r_emb, model.r_w_bias], 0.05),
                       ([*model.word_emb.emb_projs, *model.crit.out_projs], 0.01)]:
        flat = torch.cat([p.reshape(-1) for p in group])
        assert abs(flat.mean().item()) < 0.1 * std and abs(flat.std().item() - std) < 0.05 * std

    init_weights(model, init="uniform", init_range=0.2)
    linear = torch.cat([m.weight.reshape(-1) for m in model.modules() if isinstance(m, nn.Linear)])
    assert linear.abs().max() <= 0.2 and linear.std() > 0.1                # U(-0.2, 0.2) has std 0.115
    with pytest.raises(ValueError):
        init_weights(model, init="xavier")


@pytest.mark.parametrize("tie_weight", [True, False])
def test_state_dict_round_trip_keeps_tied_weights_tied(tie_weight):
    kw = dict(cutoffs=[10, 25], div_val=2, d_embed=12, tie_weight=tie_weight, tie_projs=[False, True, True])
    model = tiny_model(0, **kw)
    keys = set(model.state_dict())
    assert any(k.startswith("crit.out_layers_weights") for k in keys) is (not tie_weight)
    assert {k for k in keys if k.startswith("crit.out_projs")} == {"crit.out_projs.0"}   # clusters 1, 2 tied
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    other = tiny_model(0, seed=1, **kw)
    other.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
    data = tokens(7, 2, 40)
    assert torch.equal(model(data[:6], data[1:], None)[0], other(data[:6], data[1:], None)[0])
    if tie_weight:                                                        # the output layer reads the embedding
        with torch.no_grad():
            other.word_emb.emb_layers[1].weight.add_(1.0)
        assert not torch.equal(model(data[:6], data[1:], None)[0], other(data[:6], data[1:], None)[0])


def test_update_dropout_and_dropatt():
    model = tiny_model(0, dropout=0.1, dropatt=0.2)
    model.update_dropout(0.3)
    model.update_dropatt(0.05)
    for name, m in model.named_modules():
        if isinstance(m, nn.Dropout):
            assert m.p == (0.05 if name.endswith("dropatt") else 0.3), name


def test_reset_length_validates_and_sets():
    model = tiny_model(0)
    model.reset_length(5, 1, 7)
    assert (model.tgt_len, model.ext_len, model.mem_len) == (5, 1, 7)
    for bad in [(0, 0, 0), (1, -1, 0), (1, 0, -1)]:
        with pytest.raises(ValueError):
            model.reset_length(*bad)


@pytest.mark.parametrize("kwargs", [dict(attn_type=4), dict(cutoffs=[30, 10]), dict(cutoffs=[50]),
                                    dict(sample_softmax=5, cutoffs=[10]), dict(attn_type=1, tgt_len=0, mem_len=0)])
def test_bad_configurations_are_user_errors(kwargs):
    with pytest.raises(UserError):
        MemTransformerLM(40, 1, 2, 16, 8, 24, 0.0, 0.0, **{"tgt_len": 4, "mem_len": 4, **kwargs})
