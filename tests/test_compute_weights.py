"""bf16 compute copies of the weights (utils/training/compute_weights.py): the same step as autocast's
per-weight casts (bitwise for the nn.Linear weights, bf16 rounding for the position biases), float32
masters and checkpoints unchanged, and the casts of a bf16 step counted against the model's own sizes."""
import copy

import pytest
import torch

from lamb import Lamb
from model_testlib import tiny_model, tokens
from utils.config.schema import Config
from utils.runtime.device import amp_context, grad_scaler
from utils.runtime.step_report import OpCounter
from utils.training.compute_weights import ComputeWeights, compute_parameters
from utils.training.train_step import TrainStep

N_TOKEN = 40


def bf16_step(model, compute_weights: bool, batch_chunk=1, precision="bf16"):
    args = Config.build("train", dict(bf16=precision == "bf16", fp16=precision == "fp16"))
    device = torch.device("cpu")
    step = TrainStep(model, model, Lamb(model.parameters(), lr=0.01), grad_scaler(args, device),
                     amp_context(args, device), clip=0.25, batch_chunk=batch_chunk)
    if not compute_weights:
        step.compute_weights = None                     # autocast casts every weight, as before
    return step


def model_f32(attn_type, n_layer=2, **kwargs):
    kwargs.setdefault("dropout", 0.1)                   # dropout on: both runs must draw the same masks
    return tiny_model(attn_type, n_layer=n_layer, n_token=N_TOKEN, dtype=torch.float32, **kwargs).train()


def run_steps(model, step, n_steps=3, bsz=4):
    data = tokens(6 * n_steps + 1, bsz, N_TOKEN)
    torch.manual_seed(5)
    mems = [None] * step.batch_chunk
    losses = []
    for i in range(n_steps):
        loss, _ = step.run(data[6 * i:6 * i + 6], data[6 * i + 1:6 * i + 7], mems)
        losses.append(loss.clone())
    return losses


@pytest.mark.parametrize("batch_chunk,checkpoint", [(1, False), (2, False), (1, True)])
def test_linear_weights_in_bf16_give_autocasts_step_bit_for_bit(batch_chunk, checkpoint):
    """attention type 2 has no position parameters: every compute copy is an nn.Linear weight or bias, whose
    bf16 values and gradients are exactly autocast's (batch chunks accumulate in float32 in both)."""
    runs = []
    for compute_weights in (True, False):
        model = model_f32(2)
        model.set_checkpoint_activations(checkpoint)
        step = bf16_step(model, compute_weights, batch_chunk)
        assert (step.compute_weights is not None) == compute_weights
        runs.append((run_steps(model, step), [p.detach().clone() for p in model.parameters()]))
    (losses_a, params_a), (losses_b, params_b) = runs
    assert all(torch.equal(a, b) for a, b in zip(losses_a, losses_b))
    assert all(torch.equal(a, b) for a, b in zip(params_a, params_b))


@pytest.mark.parametrize("attn_type", [0, 1])
def test_position_parameters_in_bf16_keep_the_gradient_as_close_to_float32_as_autocast(attn_type):
    """attention types 0 / 1 also keep r_w_bias (r_r_bias; r_emb, r_bias) in bf16 (`q + r_w_bias` in bf16):
    not autocast's rounding bit for bit, but as close to the float32 gradient (relative L2 error of all
    gradients together, two steps of a tiny random model: about 5% and 1.5% for both)."""
    grads = {}
    for name, compute_weights, precision in (("new", True, "bf16"), ("autocast", False, "bf16"),
                                              ("fp32", False, "fp32")):
        model = model_f32(attn_type, dropout=0.0)
        step = bf16_step(model, compute_weights, precision=precision)
        step.optimizer.step = lambda: None                                  # keep the gradients
        run_steps(model, step, n_steps=2)
        grads[name] = torch.cat([p.grad.flatten() for p in model.parameters()]).double()
    scale = grads["fp32"].norm()
    error_new = (grads["new"] - grads["fp32"]).norm() / scale
    error_autocast = (grads["autocast"] - grads["fp32"]).norm() / scale
    assert 0 < error_autocast < 0.1
    assert error_new <= 2 * error_autocast


def test_masters_stay_float32_parameters_and_checkpoints_are_unchanged():
    model = model_f32(0)
    before = {n: (p, p.dtype) for n, p in model.named_parameters()}
    keys = list(model.state_dict())
    step = bf16_step(model, True)
    run_steps(model, step, n_steps=2)
    after = dict(model.named_parameters())
    assert {n: p for n, (p, _) in before.items()} == after                 # the same Parameter objects
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in after.values())
    assert list(model.state_dict()) == keys
    assert all(t.dtype == torch.float32 for t in model.state_dict().values() if t.is_floating_point())
    # the optimizer holds the masters (its moments are float32) and nothing else of the copies
    assert all(p.dtype == torch.float32 for g in step.optimizer.param_groups for p in g["params"])


def test_only_a_bf16_step_of_the_plain_model_gets_compute_weights():
    model = model_f32(0)
    assert bf16_step(model, True, precision="fp32").compute_weights is None
    assert bf16_step(model, True, precision="fp16").compute_weights is None
    wrapper = torch.nn.Sequential(model)                                    # stands for a DDP / FSDP wrapper
    args = Config.build("train", dict(bf16=True))
    step = TrainStep(model, wrapper, Lamb(model.parameters(), lr=0.01), grad_scaler(args, torch.device("cpu")),
                     amp_context(args, torch.device("cpu")), clip=0.25)
    assert step.compute_weights is None


def test_the_copies_follow_replaced_parameters():
    """Parameters replaced after the step was built (model.to, load of a new module) are picked up."""
    model = model_f32(2, dropout=0.0)
    step = bf16_step(model, True)
    twin = copy.deepcopy(model)
    for module, name in compute_parameters(model):
        module._parameters[name] = torch.nn.Parameter(module._parameters[name].detach().clone())
    step.optimizer = Lamb(model.parameters(), lr=0.01)
    run_steps(model, step, n_steps=1)
    reference = bf16_step(twin, False)
    run_steps(twin, reference, n_steps=1)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))


def step_counts(n_layer, compute_weights):
    model = model_f32(0, n_layer=n_layer)
    step = bf16_step(model, compute_weights)
    data = tokens(13, 4, N_TOKEN)
    mems = [None]
    step.run(data[:6], data[1:7], mems)                                      # lazy state (moments, buffers)
    with OpCounter() as counter:
        step.run(data[6:12], data[7:13], mems)
    return counter.casts, counter.total, model


def test_a_bf16_step_casts_six_times_per_layer_not_twice_per_weight():
    """Autocast casts each weight in the forward and its gradient back: at least 2 casts per weight tensor.
    With compute weights the casts no longer depend on the weights: per layer, the two LayerNorm outputs enter
    bf16 matmuls (2 casts, 2 back) and the two bf16 branches join the float32 residual stream (2 gradient
    casts) — exactly 6 more per added layer; the rest is a constant of 9 for this model (one softmax cluster):
    refresh and collection (1 each), the position sinusoid (1), the last hidden states and their gradient (2),
    the logits to float32 and back in the backward (3), the table's gradient to float32 (1). The output
    layer's weight and bias are not cast by the loss (their copies come with the refresh)."""
    casts_autocast, ops_autocast, model = step_counts(2, False)
    n_cast_weights = len(compute_parameters(model))
    assert casts_autocast >= 2 * n_cast_weights
    casts_2, ops_2, _ = step_counts(2, True)
    casts_4, ops_4, model_4 = step_counts(4, True)
    assert casts_4 - casts_2 == 2 * 6
    constant = casts_2 - 2 * 6
    assert constant <= 9
    assert casts_2 < casts_autocast - n_cast_weights
    assert ops_2 < ops_autocast
    # the base preset (16 layers, 4 softmax clusters) is measured by scripts/benchmark_train.py --report
    assert len(compute_parameters(model_4)) - n_cast_weights == 2 * 7      # 7 weight tensors per layer


@pytest.mark.slow
def test_a_compiled_bf16_step_swaps_the_copies_in_without_breaks_or_recompiles():
    """torch.compile(fullgraph=True) of the model under the swap: two graphs (memory-less first step and the
    rest), and the eager step's results bit for bit (aot_eager: the same ATen ops)."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    model = model_f32(0, dropout=0.0)
    twin = copy.deepcopy(model)
    args = Config.build("train", dict(bf16=True))
    device = torch.device("cpu")
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    graphs_before = counters["stats"]["unique_graphs"]                  # counters outlive dynamo.reset()
    step = TrainStep(model, compiled, Lamb(model.parameters(), lr=0.01), grad_scaler(args, device),
                     amp_context(args, device), clip=0.25)
    assert step.compute_weights is not None
    losses = run_steps(model, step, n_steps=4)
    assert counters["stats"]["unique_graphs"] - graphs_before == 2
    assert all(torch.equal(a, b) for a, b in zip(losses, run_steps(twin, bf16_step(twin, True), n_steps=4)))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))


def test_the_op_counter_counts_dtype_changes_views_and_the_backward():
    """The report's counter (utils/runtime/step_report.py) against ops written out by hand."""
    w = torch.randn(4, 3, requires_grad=True)
    copies = [torch.empty(4, 3, dtype=torch.bfloat16), torch.empty(2, dtype=torch.bfloat16)]
    same = torch.empty(4, 3)
    with OpCounter() as counter:
        y = w.to(torch.bfloat16)                     # cast 1
        y.float().sum().backward()                   # cast 2; the backward casts back twice: casts 3 and 4
        torch._foreach_copy_(copies, [w.detach(), torch.randn(2)])     # cast 5: one multi-tensor op
        same.copy_(w.detach())                       # same dtype: not a cast
        w.detach().t()                               # views
        w.detach() + copies[0]                       # promotes bf16 to float32: a mixed-dtype op, not a cast
        copies[0].sum(dtype=torch.float32)           # mixed too
    assert counter.casts == 5
    assert counter.mixed == 2
    assert counter.ops["_foreach_copy_"] == 1 and counter.ops["copy_"] == 1
    assert counter.views >= 3 and counter.ops["t"] == 1
    phases = counter.by_phase
    assert phases["backward"] >= 2 and sum(phases.values()) == counter.total


def test_a_bf16_step_with_compute_weights_reads_nothing_back():
    from utils.runtime.host_sync import HostSyncCounter
    model = model_f32(0)
    step = bf16_step(model, True, batch_chunk=2)
    data = tokens(13, 4, N_TOKEN)
    mems = [None, None]
    step.run(data[:6], data[1:7], mems)
    with HostSyncCounter() as syncs:
        step.run(data[6:12], data[7:13], mems)
    assert syncs.count == 0, syncs.events


def test_the_reports_unblocked_lamb_update_gives_the_same_bits():
    """benchmark_train.py --report counts LAMB with CPU_BLOCKED_UPDATE off (the GPU's multi-tensor update):
    the same step as the eager CPU's blocked update, bit for bit, so counting changes no training result."""
    import utils.training.lamb as lamb_module
    results = []
    for blocked in (True, False):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(700, 1000)), torch.nn.Parameter(torch.randn(33))]
        for p in params:
            p.grad = torch.randn_like(p)
        optimizer = Lamb(params, lr=0.01, weight_decay=0.01, fused=True)
        lamb_module.CPU_BLOCKED_UPDATE = blocked
        try:
            optimizer.step()
            with OpCounter() as counter:
                optimizer.step()
        finally:
            lamb_module.CPU_BLOCKED_UPDATE = True
        results.append(([p.detach().clone() for p in params], counter.total))
    (blocked_params, blocked_ops), (plain_params, plain_ops) = results
    assert blocked_ops > 2 * plain_ops                  # both paths ran: 3 blocks of the large tensor
    assert all(torch.equal(a, b) for a, b in zip(blocked_params, plain_params))


class ParameterCasts(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the `_to_copy` ops whose source is one of the given tensors (by storage and shape)."""

    def __init__(self, tensors):
        super().__init__()
        self.keys = {(t.data_ptr(), tuple(t.shape)) for t in tensors}
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ == "_to_copy" and (args[0].data_ptr(), tuple(args[0].shape)) in self.keys:
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("cutoffs", [[], [10, 20, 30]])
def test_the_output_layers_parameters_are_copied_with_the_weights_not_cast_by_the_loss(cutoffs):
    """The output layer's table (tied: the embedding), bias and cluster rows get their bf16 copies in the one
    refresh (ProjectedAdaptiveLogSoftmax.compute_copies) instead of a cast each in the loss; the embedding
    keeps the float32 table. The step stays autocast's bit for bit (the same rounding)."""
    runs = []
    for compute_weights in (True, False):
        model = model_f32(2, cutoffs=cutoffs, tie_weight=True, div_val=1)
        step = bf16_step(model, compute_weights, batch_chunk=2)
        outputs = model.crit.output_parameters(model.word_emb.weights())
        assert len(outputs) == (4 if cutoffs else 2)
        run_steps(model, step, n_steps=1)                               # lazy state
        with ParameterCasts(outputs) as casts:
            losses = run_steps(model, step, n_steps=2)
        assert model.crit.compute_copies is None                        # only inside the step
        runs.append((casts.count, losses, [p.detach().clone() for p in model.parameters()]))
    (casts_new, losses_new, params_new), (casts_old, losses_old, params_old) = runs
    assert casts_new == 0
    assert casts_old == 2 * 2 * len(outputs)                # autocast: each parameter per batch chunk (2), 2 steps
    assert all(torch.equal(a, b) for a, b in zip(losses_new, losses_old))
    assert all(torch.equal(a, b) for a, b in zip(params_new, params_old))
