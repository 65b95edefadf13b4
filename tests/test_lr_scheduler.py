"""LR schedules against closed-form formulas; step t (1-based) runs with lr(t), including t = 1."""
import argparse
import io
import math

import pytest
import torch

from utils.io.errors import UserError
from utils.training.lr_scheduler import LRScheduler, build_scheduler

LR0, W, M, ETA = 0.01, 10, 50, 0.001


def make_args(**overrides):
    values = dict(scheduler="cosine", lr=LR0, warmup_step=W, max_step=M, max_step_scheduler=None, eta_min=ETA,
                  decay_rate=0.5, patience=0, lr_min=0.0)
    values.update(overrides)
    return argparse.Namespace(**values)


def make_optimizer():
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=123.0)


def run(args, steps):
    """LRs seen by optimizer steps 1..steps, read from the optimizer as the training loop would."""
    opt = make_optimizer()
    sched = build_scheduler(args, opt)
    seen = []
    for t in range(1, steps + 1):
        seen.append(opt.param_groups[0]["lr"])  # the LR optimizer step t runs with
        sched.step(t)
    return seen


def cosine(t, lr0=LR0, w=W, m=M, eta=ETA):
    if t < w:
        return lr0 * t / w
    return eta + (lr0 - eta) * (1 + math.cos(math.pi * (min(t, m) - w) / (m - w))) / 2


def test_cosine_closed_form():
    seen = run(make_args(), M + 5)
    assert seen[0] == pytest.approx(LR0 / W)  # first step: warm-up LR, not lr0 (reference bug §9.11)
    assert seen[W - 2] == pytest.approx(LR0 * (W - 1) / W)
    assert seen[W - 1] == pytest.approx(LR0)  # step W: end of warm-up
    assert seen[M - 1] == pytest.approx(ETA)  # step M: end of cosine
    assert seen[M + 4] == pytest.approx(ETA)  # past M: stays at the eta_min floor
    for t, lr in enumerate(seen, start=1):
        assert lr == pytest.approx(cosine(t)), t
        assert lr >= ETA or t < W


def test_cosine_horizon_from_max_step_scheduler():
    seen = run(make_args(max_step=20, max_step_scheduler=100), 20)
    for t, lr in enumerate(seen, start=1):
        assert lr == pytest.approx(cosine(t, m=100)), t


def test_cosine_without_warmup_and_degenerate_horizon():
    seen = run(make_args(warmup_step=0), 3)
    assert seen[0] == pytest.approx(ETA + (LR0 - ETA) * (1 + math.cos(math.pi * 1 / M)) / 2)
    seen = run(make_args(warmup_step=10, max_step=5), 12)  # horizon inside the warm-up
    assert seen[:9] == pytest.approx([LR0 * t / 10 for t in range(1, 10)])
    assert seen[9:] == pytest.approx([ETA] * 3)


def test_inv_sqrt_closed_form():
    seen = run(make_args(scheduler="inv_sqrt"), 40)
    assert seen[0] == pytest.approx(LR0 * 1 / W ** 1.5)  # not 0 as in the reference
    assert seen[W - 1] == pytest.approx(LR0 / math.sqrt(W))  # peak
    for t, lr in enumerate(seen, start=1):
        want = LR0 * t / W ** 1.5 if t <= W else LR0 / math.sqrt(t)
        assert lr == pytest.approx(want), t
    seen = run(make_args(scheduler="inv_sqrt", warmup_step=0), 4)
    assert seen == pytest.approx([LR0 / math.sqrt(t) for t in range(1, 5)])


def test_constant_has_warmup_and_does_not_crash():
    seen = run(make_args(scheduler="constant"), 30)
    assert seen == pytest.approx([LR0 * min(1.0, t / W) for t in range(1, 31)])
    assert run(make_args(scheduler="constant", warmup_step=0), 3) == pytest.approx([LR0] * 3)


def test_dev_perf_reduces_after_patience():
    opt = make_optimizer()
    sched = build_scheduler(make_args(scheduler="dev_perf", patience=1, decay_rate=0.5, lr_min=0.003), opt)
    assert opt.param_groups[0]["lr"] == pytest.approx(LR0 / W)
    sched.step(W)
    assert opt.param_groups[0]["lr"] == pytest.approx(LR0)  # after warm-up: level lr0
    sched.step_eval(3.0)  # improvement (first eval)
    sched.step_eval(3.0)  # 1 bad eval: within patience
    assert opt.param_groups[0]["lr"] == pytest.approx(LR0)
    sched.step_eval(2.9999)  # improvement below the relative threshold 1e-4 -> 2nd bad eval > patience
    assert opt.param_groups[0]["lr"] == pytest.approx(LR0 * 0.5)
    sched.step_eval(2.0)  # improvement: counter reset
    sched.step_eval(2.0)
    sched.step_eval(2.0)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.003)  # 0.0025 floored at lr_min
    sched.step_eval(2.0)
    sched.step_eval(2.0)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.003)
    sched.step(W + 5)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.003)


def test_dev_perf_reduction_during_warmup_scales_the_target():
    opt = make_optimizer()
    sched = build_scheduler(make_args(scheduler="dev_perf", patience=0), opt)
    sched.step(4)
    sched.step_eval(5.0)
    sched.step_eval(5.0)  # reduction to lr0 / 2
    assert opt.param_groups[0]["lr"] == pytest.approx(LR0 / 2 * 5 / W)
    sched.step(W)
    assert opt.param_groups[0]["lr"] == pytest.approx(LR0 / 2)


def test_step_eval_is_a_no_op_for_other_schedules():
    opt = make_optimizer()
    sched = build_scheduler(make_args(), opt)
    sched.step(3)
    for _ in range(5):
        sched.step_eval(10.0)
    assert opt.param_groups[0]["lr"] == pytest.approx(cosine(4))


@pytest.mark.parametrize("name", ["cosine", "inv_sqrt", "dev_perf", "constant"])
def test_state_dict_round_trip_mid_schedule(name):
    args = make_args(scheduler=name)
    opt = make_optimizer()
    sched = build_scheduler(args, opt)
    for t in range(1, 18):
        sched.step(t)
        if t % 5 == 0:
            sched.step_eval(1.0)
    buf = io.BytesIO()
    torch.save(sched.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)

    opt2 = make_optimizer()
    sched2 = build_scheduler(args, opt2)
    sched2.load_state_dict(state)
    assert opt2.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"])
    for t in range(18, 40):
        sched.step(t)
        sched2.step(t)
        if t % 5 == 0:
            sched.step_eval(1.0)
            sched2.step_eval(1.0)
        assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    assert sched2.lr == opt2.param_groups[0]["lr"]


def test_bad_settings_are_user_errors():
    with pytest.raises(UserError, match="warmup_step"):
        build_scheduler(make_args(warmup_step=-1), make_optimizer())
    with pytest.raises(UserError, match="decay_rate"):
        build_scheduler(make_args(scheduler="dev_perf", decay_rate=1.5), make_optimizer())
    sched = build_scheduler(make_args(), make_optimizer())
    with pytest.raises(UserError, match="--scheduler cosine"):
        LRScheduler(make_optimizer(), "constant", lr=LR0).load_state_dict(sched.state_dict())
