"""Nothing is lost when a job stops: a restart continues exactly (the same losses at every step, the same
weights), after a clean stop, after SIGTERM in the middle of an epoch, and after SIGKILL while writing a
checkpoint. CPU, float32, dropout on (so the random state must be restored), several epochs."""
import json

import pytest
import torch

import cli_runner
from cli_runner import tiny_args


def train_records(work_dir):
    """Every training metrics record (full precision) by step."""
    recs = [json.loads(line) for line in (work_dir / "train_log.json").read_text().splitlines()]
    return {r["step"]: {k: r[k] for k in ("epoch", "train_batch", "lr", "train_loss", "grad_norm")}
            for r in recs if isinstance(r["step"], int) and "train_loss" in r}


def final_state(work_dir):
    state = torch.load(work_dir / "checkpoint_last.pt", weights_only=True)
    return state["model_state"], state["optimizer_state"], state["train_step"]


def assert_same_training(a, b, steps):
    ra, rb = train_records(a), train_records(b)
    assert sorted(ra) == sorted(rb) == list(steps)
    for step in steps:
        assert ra[step] == rb[step], f"step {step}: {ra[step]} != {rb[step]}"
    model_a, optim_a, step_a = final_state(a)
    model_b, optim_b, step_b = final_state(b)
    assert step_a == step_b == steps[-1]
    assert model_a.keys() == model_b.keys()
    for name in model_a:
        assert torch.equal(model_a[name], model_b[name]), name
    for index, state in optim_a["state"].items():
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(optim_b["state"][index][key])), (index, key)


@pytest.mark.parametrize("flags", [{}, {"batch_chunk": 2, "swap_mem": True}, {"roll": True, "varlen": True}],
                         ids=["plain", "batch_chunk2", "roll_varlen"])
def test_restart_continues_exactly(demo_corpus, tmp_path, flags):
    """40 steps in one go == 20 steps, stop, --restart, 20 more (the restart is in the middle of epoch 2;
    with --roll --varlen every epoch is rotated and the segment lengths vary)."""
    common = dict(max_step_scheduler=40, log_interval=1, eval_interval=20, no_test=True, **flags)
    whole = cli_runner.train(tiny_args(demo_corpus, tmp_path / "whole", max_step=40, **common), tmp_path, name="whole")
    assert whole.returncode == 0, whole.stderr
    first = cli_runner.train(tiny_args(demo_corpus, tmp_path / "split", max_step=20, **common), tmp_path, name="first")
    assert first.returncode == 0, first.stderr
    second = cli_runner.train(tiny_args(demo_corpus, tmp_path / "split", max_step=40, restart=tmp_path / "split",
                                        **common), tmp_path, name="second")
    assert second.returncode == 0, second.stderr
    assert f"Resuming from {tmp_path / 'split'} at step 20" in second.lines
    assert_same_training(tmp_path / "whole", tmp_path / "split", range(1, 41))


def test_sigterm_mid_epoch_saves_and_the_restart_continues_the_log_interval(demo_corpus, tmp_path):
    """SIGTERM after step 7 (not an eval step, log every 5): checkpoint, exit 0; the restart's next log line
    (step 10) averages steps 6-10 like the uninterrupted run's."""
    common = dict(max_step=20, eval_interval=10, log_interval=5, no_test=True)
    whole = cli_runner.train(tiny_args(demo_corpus, tmp_path / "whole", **common), tmp_path, name="whole")
    assert whole.returncode == 0, whole.stderr

    stopped = cli_runner.train(tiny_args(demo_corpus, tmp_path / "split", **common), tmp_path, name="stopped",
                               hook=cli_runner.signal_after_step, hook_args=(7,))
    assert stopped.returncode == 0, stopped.stderr
    split = tmp_path / "split"
    assert (f"Received SIGTERM, exiting after saving the checkpoint at step 7; resume with --restart {split}"
            in stopped.lines)
    assert not any(l.startswith("| Eval") for l in stopped.lines)
    assert torch.load(tmp_path / "split" / "checkpoint_last.pt", weights_only=True)["train_step"] == 7

    restart = tmp_path / "split" / "checkpoint_last.pt"
    resumed = cli_runner.train(tiny_args(demo_corpus, tmp_path / "split", restart=restart, **common), tmp_path,
                               name="resumed")
    assert resumed.returncode == 0, resumed.stderr
    logged = [l for l in resumed.lines if l.startswith("| epoch")]
    whole_lines = [l for l in whole.lines if l.startswith("| epoch")]
    # the same line but for the timing fields (ms/batch, tok/s)
    strip = lambda line: line.split("| ms/batch")[0] + line.split("| loss")[1].split(" | elapsed")[0]
    assert [strip(l) for l in logged] == [strip(l) for l in whole_lines[1:]]
    assert_same_training(tmp_path / "whole", tmp_path / "split", [5, 10, 15, 20])


def test_sigkill_while_writing_a_checkpoint_keeps_the_previous_one(demo_corpus, tmp_path):
    work = tmp_path / "work"
    argv = tiny_args(demo_corpus, work, max_step=20, eval_interval=5, no_test=True)
    killed = cli_runner.train(argv, tmp_path, name="killed", hook=cli_runner.sigkill_while_saving, hook_args=(2,))
    assert killed.returncode == -9                                    # died writing the step-10 checkpoint
    assert "Saving checkpoint" in killed.lines[-1]
    partial = list(work.glob(".checkpoint_*.pt.*.tmp"))  # step 10 is a new best: written first, then last
    assert len(partial) == 1 and partial[0].stat().st_size > 0        # the half-written file is not the checkpoint
    for name in ("checkpoint_last.pt", "checkpoint_best.pt"):
        assert torch.load(work / name, weights_only=True)["train_step"] == 5

    resumed = cli_runner.train(argv + ["--restart", str(work)], tmp_path, name="resumed")
    assert resumed.returncode == 0, resumed.stderr
    assert f"Resuming from {work} at step 5" in resumed.lines
    assert not list(work.glob(".*.tmp"))                              # the partial file was cleaned up
    assert torch.load(work / "checkpoint_last.pt", weights_only=True)["train_step"] == 20


def test_sigusr1_also_stops_with_a_checkpoint(demo_corpus, tmp_path):
    """Slurm's --signal=USR1@<seconds> warning before the time limit."""
    work = tmp_path / "work"
    result = cli_runner.train(tiny_args(demo_corpus, work, max_step=20, eval_interval=10), tmp_path,
                              hook=cli_runner.signal_after_step, hook_args=(3, "SIGUSR1"))
    assert result.returncode == 0, result.stderr
    assert (f"Received SIGUSR1, exiting after saving the checkpoint at step 3; resume with --restart {work}"
            in result.lines)
    assert not any(l.startswith("| End of training") for l in result.lines)
    assert torch.load(work / "checkpoint_last.pt", weights_only=True)["train_step"] == 3


def test_restart_without_memory_and_with_extended_context(demo_corpus, tmp_path):
    """mem_len 0 (the reference crashed at its first checkpoint) with ext_len 4 trains, checkpoints, resumes."""
    common = dict(max_step_scheduler=8, log_interval=1, eval_interval=4, no_test=True, mem_len=0, ext_len=4)
    whole = cli_runner.train(tiny_args(demo_corpus, tmp_path / "whole", max_step=8, **common), tmp_path, name="whole")
    assert whole.returncode == 0, whole.stderr
    split = tmp_path / "split"
    for max_step in (4, 8):   # the same command twice: the first finds no checkpoint in split/ yet
        part = cli_runner.train(tiny_args(demo_corpus, split, max_step=max_step, restart=split, **common), tmp_path,
                                name=f"part{max_step}")
        assert part.returncode == 0, part.stderr
    assert_same_training(tmp_path / "whole", split, range(1, 9))


@pytest.mark.slow
def test_restart_from_the_reference_checkpoint_continues_from_its_state(shared_dir, tmp_path):
    """The reference's checkpoint (Adam at lr 0.003, 100 steps on PTB, validation loss 6.80) restarts with its
    weights, Adam moments, random state, memory and data position: the first losses are near its own, far below
    a new model's log(10000) = 9.2. (tests/test_reference_resume.py checks the continuation step by step.)"""
    argv = ["--data", shared_dir / "data" / "ptb", "--dataset", "wt103", "--cache_dir", tmp_path / "cache",
            "--work_dir", tmp_path / "work", "--n_layer", 2, "--n_head", 2, "--d_model", 64, "--d_head", 32,
            "--d_inner", 128, "--dropout", 0, "--tgt_len", 32, "--mem_len", 32, "--eval_tgt_len", 32,
            "--batch_size", 8, "--max_step", 105, "--eval_interval", 105, "--eval_max_steps", 10, "--log_interval", 5,
            "--optim", "adam", "--lr", 0.003, "--scheduler", "constant", "--warmup_step", 0,
            "--no_test", "--restart", shared_dir / "fixtures" / "reference-checkpoint" / "ptb_tiny_attn0.pt"]
    result = cli_runner.train(argv, tmp_path)
    assert result.returncode == 0, result.stderr
    assert ("Restored from the reference checkpoint: model, optimizer and schedule, random state, memory, data "
            "position") in result.lines
    step105 = [json.loads(l) for l in (tmp_path / "work" / "train_log.json").read_text().splitlines()][1]
    assert step105["step"] == 105 and 6.0 < step105["train_loss"] < 7.2
    assert torch.load(tmp_path / "work" / "checkpoint_last.pt", weights_only=True)["train_step"] == 105
