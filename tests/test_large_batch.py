"""Large-batch training (README "Moving a recipe to more GPUs"): LR scaling with the global batch, token-based
schedules, the batch-size schedule (its data stream and an exact resume across a change), the gradient noise
scale against explicit per-example gradients, the LR range test, and DDP's 16-bit gradient all-reduce."""
import contextlib
import json
import math

import numpy as np
import pytest
import torch

import cli_runner
from cli_runner import tiny_args
from model_testlib import tiny_model, tokens
from test_train_resume import assert_same_training
from utils.training.batch_schedule import BatchPlan, ScheduledStream, parse_schedule
from utils.training.noise_scale import NoiseScaleMeter
from utils.training.train_step import TrainStep


def records(work_dir):
    lines = (work_dir / "train_log.json").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if isinstance(r["step"], int) and "train_loss" in r}


# ---- 1. LR scaling -------------------------------------------------------------------------------------------

def test_lr_scaling_linear_doubles_and_sqrt_multiplies_by_root_two(demo_corpus, tmp_path):
    """Global batch 32, --base_batch_size 16: the logged LR of every step after the warm-up is exactly 2x (linear)
    and sqrt(2)x (sqrt) the LR of the same run with --lr_scaling none (the factor multiplies the schedule's
    value, so the products are the same floating-point operation)."""
    common = dict(batch_size=32, max_step=8, warmup_step=3, log_interval=1, eval_interval=8, no_eval=True,
                  no_test=True)
    runs = {}
    for rule in ("none", "linear", "sqrt"):
        flags = dict(common, lr_scaling=rule, base_batch_size=16 if rule != "none" else None)
        result = cli_runner.train(tiny_args(demo_corpus, tmp_path / rule, **flags), tmp_path, name=rule)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[rule] = records(tmp_path / rule)
        if rule != "none":
            factor = {"linear": 2.0, "sqrt": math.sqrt(2.0)}[rule]
            assert (f"lr scaling: {rule}; base lr 0.01 at global batch 16, effective lr {0.01 * factor:.6g} at global "
                    f"batch 32 (x{factor:.6g})") in result.lines
    assert sorted(runs["none"]) == list(range(1, 9))
    for step in range(3, 9):                           # step 3 ends the warm-up (lr(3) = lr0)
        base = runs["none"][step]["lr"]
        assert runs["linear"][step]["lr"] == base * 2.0
        assert runs["sqrt"][step]["lr"] == base * math.sqrt(2.0)
    assert runs["none"][3]["lr"] == pytest.approx(0.01, rel=1e-12)      # the cosine at its start: lr0


def test_lr_scaling_needs_a_base_batch(demo_corpus, tmp_path):
    result = cli_runner.train(tiny_args(demo_corpus, tmp_path / "w", lr_scaling="sqrt"), tmp_path)
    assert result.returncode != 0
    assert "--lr_scaling sqrt needs --base_batch_size" in result.stderr
    assert not (tmp_path / "w").exists()


# ---- 2. token-based schedules --------------------------------------------------------------------------------

def test_token_schedules_give_one_lr_curve_per_token_and_stop_at_max_tokens(demo_corpus, tmp_path):
    """--warmup_tokens / --max_tokens at global batch 8 and 16: the LR at the same token count is the same (step
    2k at batch 8 = step k at batch 16), `tokens` counts batch x tgt_len per step, and both stop at max_tokens
    (linear schedule: the last step's LR is --lr_min)."""
    max_tokens = 16 * 8 * 10
    curves = {}
    for batch in (8, 16):
        flags = dict(batch_size=batch, warmup_tokens=16 * 8 * 3, max_tokens=max_tokens, scheduler="linear",
                     lr_min=0.001, max_step=None, warmup_step=None, log_interval=1, eval_interval=1000, no_eval=True,
                     no_test=True)
        result = cli_runner.train(tiny_args(demo_corpus, tmp_path / str(batch), **flags), tmp_path, name=str(batch))
        assert result.returncode == 0, result.stderr[-3000:]
        recs = records(tmp_path / str(batch))
        assert sorted(recs) == list(range(1, max_tokens // (batch * 8) + 1)), "did not stop at --max_tokens"
        for step, rec in recs.items():
            assert rec["tokens"] == step * batch * 8 and rec["batch_size"] == batch
        curves[batch] = {rec["tokens"]: rec["lr"] for rec in recs.values()}
    assert set(curves[16]) < set(curves[8])
    for tokens_seen, lr in curves[16].items():
        assert curves[8][tokens_seen] == lr, tokens_seen
    assert curves[16][max_tokens] == 0.001
    assert curves[16][16 * 8 * 3] == pytest.approx(0.01, rel=1e-12)   # the end of the warm-up: the peak


def test_plan_counts_tokens_and_converts_a_token_budget_to_steps():
    class Args:
        batch_schedule, batch_size, tgt_len = "0:8,10:16,12:32", 8, 4
        lr_scaling, base_batch_size, warmup_tokens, max_tokens = "linear", 8, None, None
    plan = BatchPlan(Args)
    naive = np.cumsum([0] + [plan.batch_of_step(t) * 4 for t in range(1, 40)])  # the tokens after t steps
    assert [plan.batch_of_step(t) for t in (1, 10, 11, 12, 13)] == [8, 8, 16, 16, 32]
    assert [plan.tokens_at(t) for t in range(40)] == naive.tolist()
    for budget in range(1, int(naive[-1])):
        assert plan.steps_for_tokens(budget) == int(np.searchsorted(naive, budget))
    assert [plan.lr_scale_at(t) for t in (10, 11, 13)] == [1.0, 2.0, 4.0]
    assert plan.switches_at(11) and plan.switches_at(13) and not plan.switches_at(12)
    for bad in ("1:8", "0:8,0:16", "0:8,x", "0:0"):
        with pytest.raises(ValueError):
            parse_schedule(bad)


# ---- 3. batch-size schedule ----------------------------------------------------------------------------------

def test_batch_schedule_resumes_exactly_across_the_switch(demo_corpus, tmp_path):
    """--batch_schedule "0:8,10:16": 8 sequences per step for steps 1-10, 16 after, `tokens` adds up; 20 steps
    straight == 12 steps, stop, --restart, 8 more (losses, LRs, weights, optimizer state: bit for bit). With
    --lr_scaling sqrt, --batch_chunk 2 and --log_noise_scale (a finite positive noise scale is logged)."""
    common = dict(batch_schedule="0:8,10:16", batch_size=None, lr_scaling="sqrt", base_batch_size=8, batch_chunk=2,
                  log_noise_scale=True, roll=True, log_interval=1, eval_interval=12, max_step_scheduler=20,
                  no_test=True)
    whole = cli_runner.train(tiny_args(demo_corpus, tmp_path / "whole", max_step=20, **common), tmp_path, name="w")
    assert whole.returncode == 0, whole.stderr[-3000:]
    first = cli_runner.train(tiny_args(demo_corpus, tmp_path / "split", max_step=12, **common), tmp_path, name="a")
    assert first.returncode == 0, first.stderr[-3000:]
    second = cli_runner.train(tiny_args(demo_corpus, tmp_path / "split", max_step=20, restart=tmp_path / "split",
                                        **common), tmp_path, name="b")
    assert second.returncode == 0, second.stderr[-3000:]
    assert_same_training(tmp_path / "whole", tmp_path / "split", range(1, 21))
    recs = records(tmp_path / "whole")
    assert [recs[s]["batch_size"] for s in range(1, 21)] == [8] * 10 + [16] * 10
    # the tokens of each step are its batch x tgt_len, except the epoch's last (shorter) segment
    epoch_ends = {s for s in range(1, 20) if recs[s + 1]["epoch"] != recs[s]["epoch"]}
    assert epoch_ends and min(epoch_ends) > 10, "the test should cross an epoch after the switch"
    for s in range(1, 21):
        added = recs[s]["tokens"] - (recs[s - 1]["tokens"] if s > 1 else 0)
        full = recs[s]["batch_size"] * 8
        assert added == full if s not in epoch_ends else 0 < added < full, s
    cosine = lambda t: 0.001 + (0.01 - 0.001) * (1 + math.cos(math.pi * (t - 5) / 15)) / 2  # noqa: E731
    for s in (10, 11, 20):                                # the LR follows the batch by the sqrt rule
        assert recs[s]["lr"] == pytest.approx(cosine(s) * math.sqrt(recs[s]["batch_size"] / 8), rel=1e-12)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tmp_path / "whole" / "tensorboard"), size_guidance={"histograms": 0}).Reload()
    assert len(events.Histograms("train/trust_ratio")) == 20
    for s in range(1, 21):
        assert math.isfinite(recs[s]["noise_scale"]) and recs[s]["noise_scale"] > 0
        assert 0 < recs[s]["trust_ratio_min"] <= recs[s]["trust_ratio_median"] <= recs[s]["trust_ratio_max"]


class _FakeCorpus:
    """An ordered corpus whose token ids are their positions, through data_utils' own iterator."""

    def __init__(self, n):
        import data_utils
        self.src, self.data_utils = np.arange(n), data_utils

    def iterator(self, bsz, rank=0, world_size=1, varlen=False):
        return self.data_utils.LMOrderedIterator(self.src, bsz, 5, rank=rank, world_size=world_size, varlen=varlen,
                                                 seed=3)


@pytest.mark.parametrize("roll", [False, True])
def test_a_batch_change_trains_every_remaining_token_once(roll):
    """Corpus positions as token ids; batch 4 then 12 after 7 steps, then 6 after 11: every target position of
    the epoch is trained at most once, and the ones never trained are only the epoch's stream starts (inputs
    only) and the drop of at most (batch - 1) tokens at each cut. Two ranks together see the one-rank batches."""
    n = 1003
    corpus = _FakeCorpus(n)
    schedule = {0: 4, 7: 12, 11: 6}
    steps = [0]

    def wanted():
        return schedule[max(s for s in schedule if s <= steps[0])]

    def one_epoch(rank=None):
        steps[0] = 0
        world = 1 if rank is None else 2
        stream = ScheduledStream(lambda b: corpus.iterator(b, rank or 0, world), wanted, "cpu")
        if roll:
            stream.roll(5, 1)
        out = []
        for data, target, seq_len, _ in stream:
            out.append(target)
            steps[0] += 1
        return out

    targets = one_epoch()
    flat = torch.cat([t.reshape(-1) for t in targets]).tolist()
    assert len(flat) == len(set(flat)), "a token was trained twice"
    assert [t.size(1) for t in targets[:12]] == [4] * 7 + [12] * 4 + [6]
    missing = n - len(flat)
    assert missing <= 4 + 3 + (12 + 11) + (6 + 5), missing     # starts + drops of the first layout and each cut
    ranks = [one_epoch(rank) for rank in (0, 1)]
    for whole, a, b in zip(targets, *ranks):
        assert torch.equal(torch.cat([a, b], 1), whole)


def test_scheduled_stream_resumes_from_its_state_dict():
    corpus = _FakeCorpus(777)
    steps = [0]
    wanted = lambda: 4 if steps[0] < 5 else 8  # noqa: E731
    stream = ScheduledStream(lambda b: corpus.iterator(b, varlen=True), wanted, "cpu")
    stream.roll(1, 2)
    it = iter(stream)
    seen = []
    for _ in range(9):
        seen.append(next(it)[1])
        steps[0] += 1
        if steps[0] == 7:
            state = json.loads(json.dumps(stream.state_dict()))   # plain types
    resumed = ScheduledStream(lambda b: corpus.iterator(b, varlen=True), wanted, "cpu")
    resumed.load_state_dict(state)
    resumed.roll(1, 2)                                 # the loop rolls again at the start of the resumed epoch
    steps[0] = 7
    again = iter(resumed)
    for expected in seen[7:]:
        assert torch.equal(next(again)[1], expected)
        steps[0] += 1


# ---- 5. gradient noise scale ---------------------------------------------------------------------------------

def test_noise_scale_equals_a_float64_computation_from_per_example_gradients():
    """A float64 model, batch 8 in 4 chunks of 2 sequences: the meter's |G|^2 and tr(Sigma) (from the chunk
    gradients it recovers as differences of accumulated gradients) equal the estimator computed from explicit
    per-example gradients (each sequence's own backward) within 1e-6."""
    model = tiny_model(n_layer=2, tgt_len=6, mem_len=0)
    model.train()
    data, target = tokens(6, 8, 40, seed=2), tokens(6, 8, 40, seed=3)
    params = [p for p in model.parameters() if p.requires_grad]
    per_example = []
    for j in range(8):
        model.zero_grad()
        model(data[:, j:j + 1], target[:, j:j + 1], None)[0].mean().backward()
        per_example.append(torch.cat([p.grad.reshape(-1) for p in params]))
    g = torch.stack(per_example)                                   # [8, n_params] float64
    chunks = g.reshape(4, 2, -1).mean(1)
    small = chunks.pow(2).sum(1).mean()
    big = g.mean(0).pow(2).sum()
    b, B = 2.0, 8.0
    expected_grad_sq = (B * big - b * small) / (B - b)
    expected_trace = (small - big) / (1 / b - 1 / B)

    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    step = TrainStep(model, model, optimizer, scaler, contextlib.nullcontext, clip=1e9, batch_chunk=4)
    meter = NoiseScaleMeter(model.parameters(), chunks=4, sees_last_chunk=True, scaler=scaler)
    meter.global_batch, meter.local_batch = 8, 8
    step.observer = meter
    step(data, target, [None] * 4)
    trace, grad_sq = meter.read()
    assert abs(grad_sq - expected_grad_sq.item()) <= 1e-6 * abs(expected_grad_sq.item())
    assert abs(trace - expected_trace.item()) <= 1e-6 * abs(expected_trace.item())
    assert trace > 0 and grad_sq > 0


def test_noise_scale_sums_of_an_open_log_interval_resume_exactly():
    """Two steps, a checkpoint of the meter (plain types, through JSON), a new meter, a third step: the sums
    equal three steps in one meter bit for bit (the noise scale of a log interval cut by a restart)."""
    def meter_after(steps, resume_after=None):
        model = tiny_model(n_layer=1, tgt_len=4, mem_len=0)
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        step = TrainStep(model, model, optimizer, scaler, contextlib.nullcontext, clip=1e9, batch_chunk=2)
        step.observer = NoiseScaleMeter(model.parameters(), chunks=2, sees_last_chunk=True, scaler=scaler)
        for t in range(steps):
            if t == resume_after:
                saved = {"ranks": [json.loads(json.dumps(step.observer.state_dict()))]}
                step.observer = NoiseScaleMeter(model.parameters(), chunks=2, sees_last_chunk=True, scaler=scaler)
                step.observer.load_state_dict(saved, 0, "cpu")
            step.observer.global_batch = step.observer.local_batch = 4
            step(tokens(4, 4, 40, seed=10 + t), tokens(4, 4, 40, seed=20 + t), [None, None])
        return step.observer.read(), step.observer.steps
    assert meter_after(3) == meter_after(3, resume_after=2)


@pytest.mark.parametrize("fused", [True, False], ids=["jitlamb", "lamb"])
def test_lamb_trust_ratios_are_the_formula_of_the_step(fused):
    """The trust ratios a LAMB step keeps are w / (||u|| + eps), w = clamp(||p||, 0, 10), computed here in float64
    from the update's formula (first step: m = (1 - b1) g, v = (1 - b2) g^2); one zero parameter gets 1."""
    from utils.training.lamb import Lamb
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3) * s) for s in (0.1, 2.0, 30.0)]
    params.append(torch.nn.Parameter(torch.zeros(4)))
    for p in params:
        p.grad = torch.randn_like(p)
    expected = []
    for p in params:
        p64, g64 = p.detach().double(), p.grad.double()
        u = (0.1 * g64) / ((0.001 * g64 * g64).sqrt() + 1e-6) + 0.01 * p64
        w = p64.norm().clamp(0, 10)
        expected.append(1.0 if w == 0 else (w / (u.norm() + 1e-6)).item())
    optimizer = Lamb(params, lr=0.1, weight_decay=0.01, fused=fused)
    optimizer.keep_trust_ratios()
    optimizer.step()
    assert optimizer.trust_ratios.tolist() == pytest.approx(expected, rel=1e-5)   # float32 norms


# ---- 4. LR range test ----------------------------------------------------------------------------------------

def test_lr_range_test_on_the_demo_preset(demo_corpus, tmp_path):
    """The cpu_small demo preset: a suggestion inside [min, max] by the stated rule, the JSONL (one record per
    step, the LR growing exponentially), a PNG, and a smoothed loss at the suggestion below the first loss."""
    work = tmp_path / "range"
    argv = ["--config_file", "configs/cpu_small.yaml", "--config", "demo", "--data", str(demo_corpus), "--work_dir",
            str(work), "--batch_size", "16", "--lr_range_test", "--lr_range_min", "1e-3", "--lr_range_max", "10",
            "--lr_range_steps", "30"]
    result = cli_runner.train(argv, tmp_path, name="range")
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(x for x in result.lines if x.startswith("suggested lr: "))
    assert "rule: steepest descent of the smoothed loss against log(lr)" in line
    suggested = float(line.split()[2])
    assert 1e-3 <= suggested <= 10
    recs = [json.loads(x) for x in (work / "lr_range_test.jsonl").read_text().splitlines()]
    assert 10 < len(recs) <= 30 and [r["step"] for r in recs] == list(range(1, len(recs) + 1))
    for r in recs:
        assert r["lr"] == pytest.approx(1e-3 * 1e4 ** ((r["step"] - 1) / 29), rel=1e-12)
    at = min(recs, key=lambda r: abs(math.log(r["lr"] / suggested)))
    assert at["smoothed_loss"] < recs[0]["loss"]
    png = (work / "lr_range_test.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 1000
    assert not (work / "checkpoint_last.pt").exists()


# ---- several processes: DDP with the batch schedule, the noise scale from the ranks, 16-bit all-reduce ---------

DDP_FLAGS = ["--batch_schedule", "0:8,10:16", "--lr_scaling", "linear", "--base_batch_size", "8", "--max_step", "20",
             "--no_eval", "--no_test", "--log_noise_scale", "--ddp_bucket_cap_mb", "1"]


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    """20 steps of --batch_schedule 0:8,10:16 across two epochs: one process with --batch_chunk 2, and two gloo
    processes with each --ddp_comm_hook (none and fp16 with one chunk per rank, bf16 with two)."""
    from dist_testlib import python_train, torchrun
    from utils.data.demo_corpus import write_demo_corpus
    tmp = tmp_path_factory.mktemp("ddp_large_batch")
    data = write_demo_corpus(tmp / "demo", n_train_docs=4, n_eval_docs=2)
    one = python_train(data, tmp / "one", *DDP_FLAGS, "--batch_chunk", "2")
    assert one.returncode == 0, one.stderr[-3000:]
    for hook, chunks in (("none", "1"), ("fp16", "1"), ("bf16", "2")):
        two = torchrun(2, data, tmp / hook, *DDP_FLAGS, "--multi_gpu", "ddp", "--ddp_comm_hook", hook,
                       "--batch_chunk", chunks)
        assert two.returncode == 0, (two.stdout + two.stderr)[-3000:]
    return tmp


def ddp_records(work_dir):
    from dist_testlib import records as dist_records
    return {r["step"]: r for r in dist_records(work_dir) if isinstance(r["step"], int) and "train_loss" in r}


@pytest.mark.slow
def test_batch_schedule_and_noise_scale_with_two_ddp_processes(ddp_runs):
    """Two processes train like one (within 1e-5: another reduction order) across the batch change and an epoch
    end; the noise scale of two processes with one chunk each (each rank's gradient, taken by the DDP hook
    before the all-reduce) equals the one process's from its two chunks (the same columns: rank r's share is
    chunk r) within float32 rounding."""
    one, two = ddp_records(ddp_runs / "one"), ddp_records(ddp_runs / "none")
    assert sorted(one) == sorted(two) == list(range(1, 21))
    assert max(abs(one[s]["train_loss"] - two[s]["train_loss"]) for s in one) <= 1e-5
    assert [two[s]["batch_size"] for s in range(1, 21)] == [8] * 10 + [16] * 10 and two[20]["epoch"] > 1
    for s in one:
        assert abs(one[s]["noise_scale"] - two[s]["noise_scale"]) <= 1e-3 * abs(one[s]["noise_scale"]), s


@pytest.mark.slow
def test_fp16_and_bf16_comm_hooks_train_like_the_plain_all_reduce(ddp_runs):
    """After 20 steps (and at every step) the losses with the fp16 and bf16 gradient all-reduce are within 1e-3
    (relative) of the float32 all-reduce; fp16 (same chunking as the plain run) does change them. bf16 runs
    with two chunks per rank: its noise scale comes from the first chunk of each rank."""
    plain = ddp_records(ddp_runs / "none")
    for hook in ("fp16", "bf16"):
        ours = ddp_records(ddp_runs / hook)
        assert sorted(ours) == list(range(1, 21))
        worst = max(abs(ours[s]["train_loss"] - plain[s]["train_loss"]) / plain[s]["train_loss"] for s in plain)
        assert worst <= 1e-3, (hook, worst)
        assert all(math.isfinite(r["noise_scale"]) for r in ours.values())
    fp16 = ddp_records(ddp_runs / "fp16")
    assert any(fp16[s]["train_loss"] != plain[s]["train_loss"] for s in range(2, 21)), "fp16: no effect at all"


@pytest.mark.slow
def test_lr_range_test_with_two_ddp_processes(tmp_path):
    """The LR range test under torchrun (gloo, DDP): rank 0 writes the files, one suggestion line."""
    from dist_testlib import torchrun
    from utils.data.demo_corpus import write_demo_corpus
    data = write_demo_corpus(tmp_path / "demo", n_train_docs=4, n_eval_docs=2)
    result = torchrun(2, data, tmp_path / "range", "--multi_gpu", "ddp", "--lr_range_test", "--lr_range_steps", "12",
                      "--lr_range_min", "1e-3", "--lr_range_max", "10")
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    lines = [x for x in result.stdout.splitlines() if "suggested lr: " in x]
    assert len(lines) == 1 and 1e-3 <= float(lines[0].split("suggested lr: ")[1].split()[0]) <= 10
    recs = [json.loads(x) for x in (tmp_path / "range" / "lr_range_test.jsonl").read_text().splitlines()]
    assert len(recs) >= 11 and all(math.isfinite(r["loss"]) for r in recs[:11])
    assert (tmp_path / "range" / "lr_range_test.png").read_bytes().startswith(b"\x89PNG")
