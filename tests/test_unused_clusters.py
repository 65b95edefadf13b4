"""Tail clusters absent from a batch keep their parameters and optimizer state (utils/training/unused_clusters.py),
as in the reference, whose data-dependent model leaves them without a gradient: checked against that second
code path, the same step with those gradients set to None before the optimizer runs (torch optimizers skip
a parameter without a gradient). Also the reference's order of dropout draws (mem_transformer.py)."""
import copy

import pytest
import torch

from lamb import Lamb
from model_testlib import tiny_model
from utils.config.schema import Config
from utils.runtime.device import amp_context, grad_scaler
from utils.training.train_step import TrainStep
from utils.training.unused_clusters import UnusedClusterGuard

CUTOFFS = [10, 20, 30]          # clusters [0, 10) [10, 20) [20, 30) [30, 40)


def model_div2(tie_weight=True, tie_projs=(False, True, True, True)):
    return tiny_model(0, n_token=40, d_model=16, cutoffs=CUTOFFS, div_val=2, d_embed=16, tie_weight=tie_weight,
                      tie_projs=list(tie_projs)).train()


def unused_parameter_names(model, data, target):
    """The reference's rule, written out: the parameters of tail clusters that no input / no target touches."""
    names = []
    for i in range(1, len(CUTOFFS) + 1):
        lo, hi = ([0] + CUTOFFS + [40])[i], ([0] + CUTOFFS + [40])[i + 1]
        by_input = bool(((data >= lo) & (data < hi)).any())
        by_target = bool(((target >= lo) & (target < hi)).any())
        if not by_input and not (model.crit.tie_weight and by_target):
            names.append(f"word_emb.emb_layers.{i}.weight")
        if not by_input and not (model.crit.tie_projs[i] and by_target):
            names.append(f"word_emb.emb_projs.{i}")
        if not by_target:
            names.append(f"crit.out_layers_biases.{i}")
            if not model.crit.tie_weight:
                names.append(f"crit.out_layers_weights.{i}")
            if model.crit.own_proj_index[i] >= 0:
                names.append(f"crit.out_projs.{model.crit.own_proj_index[i]}")
    return names


def step_of(model):
    args = Config.build("train", {})
    device = torch.device("cpu")
    return TrainStep(model, model, Lamb(model.parameters(), lr=0.05), grad_scaler(args, device),
                     amp_context(args, device), clip=0.25)


@pytest.mark.parametrize("tie_weight, tie_projs", [(True, (False, True, True, True)),
                                                   (False, (False, False, False, False))])
def test_an_untouched_cluster_keeps_its_parameters_and_moments_as_without_a_gradient(tie_weight, tie_projs):
    g = torch.Generator().manual_seed(3)
    # step 1 touches every cluster (moments become non-zero); step 2 only the head and cluster 1
    first = torch.arange(0, 40).reshape(8, 5) % 40
    second = torch.randint(0, 20, (7, 5), generator=g)
    batches = [(first[:6], first[1:7]), (second[:6], second[1:7])]
    guarded = model_div2(tie_weight, tie_projs)
    plain = copy.deepcopy(guarded)
    step = step_of(guarded)
    assert step.cluster_guard.active
    optimizer = Lamb(plain.parameters(), lr=0.05)
    mems_a, mems_b = [None], [None]
    for data, target in batches:
        step(data, target, mems_a)
        # the second code path: the reference's gradients (None for what the batch does not touch)
        optimizer.zero_grad(set_to_none=True)
        loss, mems_b[0] = plain(data, target, mems_b[0])
        loss.float().mean().backward()
        unused = set(unused_parameter_names(plain, data, target))
        for name, p in plain.named_parameters():
            if name in unused:
                p.grad = None
        torch.nn.utils.clip_grad_norm_([p for p in plain.parameters() if p.grad is not None], 0.25)
        optimizer.step()
    assert unused, "the second batch must leave some cluster untouched"
    for (name, a), b in zip(guarded.named_parameters(), plain.parameters()):
        assert torch.allclose(a, b, rtol=0, atol=1e-12), name
        sa, sb = step.optimizer.state[a], optimizer.state[b]
        for key in ("exp_avg", "exp_avg_sq"):
            # a parameter that never had a gradient has no state there: ours must be a fresh state's zeros
            expected = sb[key] if sb else torch.zeros_like(a)
            assert torch.allclose(sa[key], expected, rtol=0, atol=1e-12), (name, key)
    # and without the guard the untouched tables would have moved (the test can fail)
    moved = model_div2(tie_weight, tie_projs)
    bare = step_of(moved)
    bare.cluster_guard = UnusedClusterGuard(torch.nn.Module())
    for data, target in batches:
        bare(data, target, [None])
    assert any(not torch.equal(dict(moved.named_parameters())[n], dict(guarded.named_parameters())[n])
               for n in unused)


@pytest.mark.parametrize("tie_weight, tie_projs", [(True, (False, True, True, True)),
                                                   (False, (False, False, False, False)),
                                                   (True, (True, True, False, True))])
def test_the_untouched_parameters_are_exactly_those_with_a_zero_gradient(tie_weight, tie_projs):
    """An oracle independent of the rule: in the static-shape model an untouched parameter's gradient is exact
    zeros (masked out), a touched one's is not (random weights). The guard's flags must say which is which, and
    every parameter it does not guard must always have a gradient."""
    model = model_div2(tie_weight, tie_projs)
    guard = UnusedClusterGuard(model)
    guarded = {id(p): (cluster, by_input, by_target) for p, cluster, by_input, by_target in guard.entries}
    g = torch.Generator().manual_seed(5)
    batches = [(torch.randint(lo_in, hi_in, (6, 3), generator=g), torch.randint(lo_t, hi_t, (6, 3), generator=g))
               for lo_in, hi_in, lo_t, hi_t in [(0, 40, 0, 40), (0, 10, 0, 10), (10, 20, 0, 10), (0, 10, 20, 30),
                                                (10, 40, 30, 40), (20, 30, 10, 20)]]
    for data, target in batches:
        model.zero_grad(set_to_none=True)
        loss, _ = model(data, target, None)
        loss.float().mean().backward()
        used = guard.usage(data, target)
        for name, p in model.named_parameters():
            has_gradient = p.grad is not None and bool((p.grad != 0).any())
            if id(p) in guarded:
                cluster, by_input, by_target = guarded[id(p)]
                flag = bool((used[cluster, 0] & by_input) | (used[cluster, 1] & by_target))
                assert flag == has_gradient, (name, data.unique().tolist(), target.unique().tolist())
            else:
                assert has_gradient, (name, "has no gradient but is not guarded")


def test_adam_and_a_cluster_touched_only_by_inputs_or_only_by_targets():
    """Untied, weight decay on, Adam (its step count is state too): later steps where a cluster already trained
    is touched only by inputs, or only by targets; against the None-gradient second path."""
    guarded = model_div2(False, (False, False, False, False))
    plain = copy.deepcopy(guarded)
    args = Config.build("train", {})
    device = torch.device("cpu")
    step = TrainStep(guarded, guarded, torch.optim.Adam(guarded.parameters(), lr=0.01, weight_decay=0.1),
                     grad_scaler(args, device), amp_context(args, device), clip=0.25)
    optimizer = torch.optim.Adam(plain.parameters(), lr=0.01, weight_decay=0.1)
    g = torch.Generator().manual_seed(7)
    everything = torch.arange(0, 40).reshape(8, 5)
    batches = [(everything[:6], everything[1:7]),                                     # every cluster
               (torch.randint(20, 30, (6, 3), generator=g), torch.randint(0, 10, (6, 3), generator=g)),  # 2: inputs
               (torch.randint(0, 10, (6, 3), generator=g), torch.randint(30, 40, (6, 3), generator=g)),  # 3: targets
               (torch.randint(0, 40, (6, 3), generator=g), torch.randint(0, 40, (6, 3), generator=g))]
    for data, target in batches:
        step(data, target, [None])
        optimizer.zero_grad(set_to_none=True)
        loss, _ = plain(data, target, None)
        loss.float().mean().backward()
        unused = set(unused_parameter_names(plain, data, target))
        for name, p in plain.named_parameters():
            if name in unused or (name == "word_emb.emb_projs.0" and not bool((data < 10).any())) \
                    or (name == "word_emb.emb_layers.0.weight" and not bool((data < 10).any())):
                p.grad = None
        torch.nn.utils.clip_grad_norm_([p for p in plain.parameters() if p.grad is not None], 0.25)
        optimizer.step()
    for (name, a), b in zip(guarded.named_parameters(), plain.parameters()):
        assert torch.allclose(a, b, rtol=0, atol=1e-12), name
        sa, sb = step.optimizer.state[a], optimizer.state[b]
        for key in ("exp_avg", "exp_avg_sq", "step"):
            expected = sb[key] if sb else torch.zeros_like(sa[key])
            assert torch.allclose(sa[key].double(), expected.double(), rtol=0, atol=1e-12), (name, key)


def test_the_guard_is_off_where_every_parameter_is_always_used():
    assert not UnusedClusterGuard(tiny_model(0, n_token=40, cutoffs=CUTOFFS, div_val=1)).active
    assert not UnusedClusterGuard(tiny_model(0, n_token=40)).active


@pytest.mark.parametrize("attn_type", [0, 1, 2, 3])
def test_dropout_draws_in_the_reference_order(attn_type, monkeypatch):
    """reference-inventory.md §2.2 / mem_transformer.py of the reference: the embeddings' mask first (type 0: then
    the positions'), then each layer's (attention output, feed-forward inner, feed-forward output), then the
    output's; the same random state then gives the same masks."""
    shapes = []
    original = torch.nn.Dropout.forward

    def recording(self, x):
        if self.p > 0:
            shapes.append(tuple(x.shape))
        return original(self, x)

    monkeypatch.setattr(torch.nn.Dropout, "forward", recording)
    model = tiny_model(attn_type, n_layer=2, n_token=40, d_model=16, d_inner=24, dropout=0.1).train()
    data = torch.randint(0, 40, (6, 3))
    model(data, data, None)
    per_layer = [(6, 3, 16), (6, 3, 24), (6, 3, 16)]
    start = [(6, 3, 16), (6, 16)] if attn_type == 0 else [(6, 3, 16)]
    assert shapes == start + per_layer * 2 + [(6, 3, 16)], shapes
