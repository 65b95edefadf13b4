"""Multi-process training on the CPU (gloo): the same numbers as one process, torchrun on one and on two
"nodes", restarts after a killed worker, preemption, a peer that never joins or dies.

The truth is a single process training on the whole global batch: DDP and FSDP over 2 processes, with and
without gradient accumulation, must give the same per-step losses and the same final weights (to float32
rounding, <= 1e-5), and a run that was killed or preempted and resumed must end where the uninterrupted run
ended. Every launch costs a few seconds of process start-up; the models are tiny.
"""
import signal
import time

import pytest
import torch

from dist_testlib import (kill_quietly, last_checkpoint, max_weight_difference, python_train, start_ranks, step_losses, summary, torchrun, valid_losses, wait_all, wait_for,
                          worker_pid, free_port)
from utils.data.demo_corpus import write_demo_corpus

from utils.distributed.group import adopt_slurm_env, first_host

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not available")

STEPS = 20
TOL = 1e-5


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_demo_corpus(tmp_path_factory.mktemp("demo"), n_train_docs=100, n_eval_docs=10)


@pytest.fixture(scope="module")
def baseline(data, tmp_path_factory):
    """One process, global batch 8, 20 steps."""
    work = tmp_path_factory.mktemp("one_process")
    result = python_train(data, work, "--max_step", str(STEPS))
    assert result.returncode == 0, result.stderr[-3000:]
    return work


@pytest.fixture(scope="module")
def reference40(data, tmp_path_factory):
    """One process, 40 steps: what a killed or preempted and resumed run must end with."""
    work = tmp_path_factory.mktemp("one_process_40")
    result = python_train(data, work, "--max_step", "40")
    assert result.returncode == 0, result.stderr[-3000:]
    return work


def assert_same_training(work, reference, steps=STEPS):
    ours, theirs = step_losses(work), step_losses(reference)
    assert sorted(ours) == list(range(1, steps + 1)), f"steps logged: {sorted(ours)}"
    worst = max(abs(ours[s] - theirs[s]) for s in ours)
    assert worst <= TOL, f"per-step losses differ by up to {worst:.3g}"
    assert valid_losses(work).keys() == valid_losses(reference).keys()
    for step, loss in valid_losses(work).items():
        assert abs(loss - valid_losses(reference)[step]) <= TOL, f"valid loss at step {step}"
    diff = max_weight_difference(last_checkpoint(work)["model_state"], last_checkpoint(reference)["model_state"])
    assert diff <= TOL, f"final weights differ by up to {diff:.3g}"
    assert abs(summary(work)["test_loss"] - summary(reference)["test_loss"]) <= TOL


@pytest.mark.slow
@pytest.mark.parametrize("mode, extra", [
    ("ddp", []),
    ("ddp", ["--batch_chunk", "2"]),
    ("fsdp", []),
], ids=["ddp", "ddp-batch_chunk2", "fsdp"])
def test_two_processes_train_like_one(data, baseline, tmp_path, mode, extra):
    result = torchrun(2, data, tmp_path, "--max_step", str(STEPS), "--multi_gpu", mode, *extra)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert f"world size: 2 ({mode})" in result.stdout
    assert_same_training(tmp_path, baseline)
    ckpt = last_checkpoint(tmp_path)
    assert ckpt["world_size"] == 2 and len(ckpt["memory"]) == 2 and len(ckpt["data_states"]) == 2
    assert not torch.equal(ckpt["rng_states"][0]["torch"], ckpt["rng_states"][1]["torch"]), \
        "both ranks drew from the same random stream (dropout masks would repeat across ranks)"
    assert_loads_into_one_process(ckpt, last_checkpoint(baseline))


def assert_loads_into_one_process(ckpt, reference):
    """A checkpoint written by several processes has the single-process layout: full weights and a numbered
    optimizer state that a plain model and optimizer load, equal to what the single process saved."""
    from mem_transformer import MemTransformerLM
    from utils.config.cli import parse_args, train_parser
    from utils.training.optimizers import build_optimizer

    model = MemTransformerLM(**ckpt["model_config"])
    model.load_state_dict(ckpt["model_state"], strict=True)
    args = parse_args(train_parser(), ["--config_file", "configs/cpu_small.yaml", "--config", "demo"])
    build_optimizer(args, model).load_state_dict(ckpt["optimizer_state"])
    assert ckpt["optimizer_state"]["param_groups"] == reference["optimizer_state"]["param_groups"]
    for index, state in reference["optimizer_state"]["state"].items():
        for key, value in state.items():
            other = ckpt["optimizer_state"]["state"][index][key]
            if torch.is_tensor(value):
                assert (other - value).abs().max().item() <= TOL, f"optimizer state {index}.{key}"
            else:
                assert other == value


@pytest.mark.slow
def test_eval_over_two_processes_with_an_uneven_split(baseline, data, tmp_path):
    """eval.py with 5 columns over 2 ranks (3 + 2): the ranks' losses are weighted by their columns, so the
    result is one process's to float rounding."""
    import sys
    from dist_testlib import run
    args = ["eval.py", "--model", str(baseline / "checkpoint_last.pt"), "--data", str(data), "--dataset", "custom",
            "--batch_size", "5", "--tgt_len", "32", "--mem_len", "32", "--split", "test", "--no_cuda"]
    one = run([sys.executable, *args, "--work_dir", str(tmp_path / "one")], 120)
    two = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args,
               "--work_dir", str(tmp_path / "two")], 180)
    assert one.returncode == 0 and two.returncode == 0, (one.stderr + two.stdout + two.stderr)[-4000:]

    def loss(out):
        line = [x for x in out.splitlines() if x.startswith("| test loss")][-1]
        return float(line.split("|")[2].split()[-1])                   # the ppl, printed with 3 decimals
    assert loss(two.stdout) == pytest.approx(loss(one.stdout), abs=2e-3)


@pytest.mark.slow
def test_two_torchrun_agents_as_two_nodes(data, baseline, tmp_path):
    """`torchrun --nnodes 2` twice on 127.0.0.1 (c10d rendezvous), one process each."""
    port = free_port()
    launcher = ["--nnodes=2", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=txl-test"]
    agents = [torchrun(1, data, tmp_path, "--max_step", str(STEPS), launcher=launcher, background=True)
              for _ in range(2)]
    try:
        outputs = [agent.communicate(timeout=240)[0] for agent in agents]
    finally:
        for agent in agents:
            kill_quietly(agent)
    for agent, out in zip(agents, outputs):
        assert agent.returncode == 0, out[-4000:]
    assert any("world size: 2 (ddp)" in out for out in outputs)
    assert_same_training(tmp_path, baseline)


@pytest.mark.slow
def test_killed_worker_is_restarted_and_training_resumes(data, reference40, tmp_path):
    """SIGKILL to a worker after the first checkpoint: torchrun --max-restarts restarts both workers, they
    resume from checkpoint_last.pt by themselves and end with the uninterrupted run's weights."""
    steps = 40
    work = tmp_path / "restarted"
    agent = torchrun(2, data, work, "--max_step", str(steps), launcher=["--standalone", "--max-restarts=1"],
                     background=True)
    try:
        wait_for(lambda: (work / "checkpoint_last.pt").is_file(), 120, "the first checkpoint")
        victim = wait_for(lambda: worker_pid(agent.pid, 1), 10, "the rank-1 worker")
        step_at_kill = max(step_losses(work), default=0)
        assert step_at_kill < steps, "training ended before the worker could be killed; the test needs more steps"
        import os
        os.kill(victim, signal.SIGKILL)
        out, _ = agent.communicate(timeout=240)
    finally:
        kill_quietly(agent)
    assert agent.returncode == 0, out[-4000:]
    log = (work / "train_log.log").read_text()
    assert "torchrun restarted the workers: resuming from" in log
    assert "Resuming from" in log
    assert summary(work), "no end-of-training summary after the restart"
    diff = max_weight_difference(last_checkpoint(work)["model_state"], last_checkpoint(reference40)["model_state"])
    assert diff <= TOL, f"weights after kill + restart differ from the uninterrupted run by {diff:.3g}"
    ours, theirs = step_losses(work), step_losses(reference40)
    assert max(abs(ours[s] - theirs[s]) for s in theirs) <= TOL


@pytest.mark.slow
def test_preemption_signal_to_one_rank_stops_all_and_resume_is_exact(data, reference40, tmp_path):
    """SIGUSR1 to rank 1 only (started by hand, as srun starts them): both ranks finish the step, rank 0
    writes the checkpoint and the `preempted` file, both exit 0; `--restart auto` then removes the file and
    finishes with the uninterrupted run's weights.
    FSDP, so that the sharded save and load paths are the ones under test."""
    steps = 40
    work = tmp_path / "preempted"
    procs = start_ranks(2, data, work, "--max_step", str(steps), "--multi_gpu", "fsdp", "--restart", "auto")
    try:
        wait_for(lambda: max(step_losses(work), default=0) >= 3, 120, "training to start")
        procs[1].send_signal(signal.SIGUSR1)
        results = wait_all(procs, 120)
    finally:
        for p in procs:
            kill_quietly(p)
    assert [r[0] for r in results] == [0, 0], [r[2][-2000:] for r in results]
    stopped_at = last_checkpoint(work)["train_step"]
    assert 3 <= stopped_at < steps
    assert f"Received a signal (on another rank), exiting after saving the checkpoint at step {stopped_at}" \
        in results[0][1]                                              # rank 0 logs; rank 1 got the signal
    assert (work / "preempted").read_text().startswith(f"stopped by a signal (on another rank) after step {stopped_at}")

    procs = start_ranks(2, data, work, "--max_step", str(steps), "--multi_gpu", "fsdp", "--restart", "auto")
    results = wait_all(procs, 180)
    assert [r[0] for r in results] == [0, 0], [r[2][-2000:] for r in results]
    assert not (work / "preempted").exists()
    assert f"Resuming from {work / 'checkpoint_last.pt'} at step {stopped_at}" in (work / "train_log.log").read_text()
    diff = max_weight_difference(last_checkpoint(work)["model_state"], last_checkpoint(reference40)["model_state"])
    assert diff <= TOL, f"weights after preemption + resume differ from the uninterrupted run by {diff:.3g}"


@pytest.mark.slow
def test_peer_that_never_joins_ends_with_a_clear_message(data, tmp_path):
    """Rank 0 of 2 alone: after --dist_timeout it exits with one line that says what happened."""
    procs = start_ranks(2, data, tmp_path, "--max_step", "5", timeout_s=3)
    kill_quietly(procs[1])                                        # rank 1 never joins
    start = time.time()
    (code, _, stderr), = wait_all(procs[:1], 90)
    assert code == 2, stderr[-2000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: rank 0 of 2: the processes did not meet at 127.0.0.1:"), last
    assert "within 3 s" in last and "Traceback" not in stderr
    assert time.time() - start < 60


@pytest.mark.slow
def test_peer_that_dies_mid_training_ends_the_job_with_a_clear_message(data, tmp_path):
    """No torchrun to clean up (srun without --kill-on-bad-exit): the survivor must not hang."""
    procs = start_ranks(2, data, tmp_path, "--max_step", "100000", "--eval_interval", "5", timeout_s=20)
    try:
        wait_for(lambda: (tmp_path / "checkpoint_last.pt").is_file(), 120, "the first checkpoint")
        procs[1].send_signal(signal.SIGKILL)
        start = time.time()
        (code, _, stderr), = wait_all(procs[:1], 90)
    finally:
        for p in procs:
            kill_quietly(p)
    assert code == 4, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: rank 0: another process of the job failed or stopped answering"), last
    assert time.time() - start < 60
    assert last_checkpoint(tmp_path)["train_step"] % 5 == 0           # the last good checkpoint is intact


def test_uneven_batch_split_is_refused():
    from argparse import Namespace
    from utils.training.run_setup import check_batch_split
    from utils.io.errors import UserError

    check_batch_split(Namespace(batch_size=6, batch_chunk=2), 1)       # one process: 6 columns in 2 chunks
    check_batch_split(Namespace(batch_size=8, batch_chunk=2), 2)
    with pytest.raises(UserError, match=r"the batch per process \(6 / 2 = 3\) does not split into --batch_chunk 2"):
        check_batch_split(Namespace(batch_size=6, batch_chunk=2), 2)
    with pytest.raises(UserError, match="--batch_size 6 does not split evenly over 4 processes"):
        check_batch_split(Namespace(batch_size=6, batch_chunk=1), 4)


def test_several_processes_use_ddp_and_refuse_dp(monkeypatch):
    from utils.config.schema import Config
    from utils.distributed import group as distributed
    from utils.io.errors import UserError

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(distributed, "init_distributed", lambda device, timeout: None)
    with pytest.raises(UserError, match="--multi_gpu dp is a single-process mode"):
        distributed.init_from_env(Config.build("train", dict(multi_gpu="dp", cuda=False, dist_timeout=5)))
    args = distributed.init_from_env(Config.build("train", dict(multi_gpu=None, cuda=False, dist_timeout=5)))
    assert args.multi_gpu == "ddp"


def test_first_host_of_slurm_node_lists():
    assert first_host("gpu[07-09,12],cpu1") == "gpu07"
    assert first_host("node3") == "node3"
    assert first_host("dgx-a[1-2]") == "dgx-a1"
    assert first_host("n[001]") == "n001"
    assert first_host("x,y") == "x"


def test_slurm_task_variables_become_torch_ones():
    step = {"SLURM_STEP_ID": "0", "SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "16", "SLURM_LOCALID": "5",
            "SLURM_STEP_NODELIST": "dgx[3-4]", "SLURM_JOB_ID": "1234", "SLURM_NTASKS": "16"}
    environ = dict(step)
    assert adopt_slurm_env(environ)
    assert (environ["RANK"], environ["WORLD_SIZE"], environ["LOCAL_RANK"]) == ("5", "16", "5")
    assert environ["MASTER_ADDR"] == "dgx3" and environ["MASTER_PORT"] == str(20000 + 1234)

    environ = dict(step, MASTER_ADDR="head", MASTER_PORT="29500")         # run.sub's choice is kept
    assert adopt_slurm_env(environ) and (environ["MASTER_ADDR"], environ["MASTER_PORT"]) == ("head", "29500")
    environ = dict(step, RANK="3", WORLD_SIZE="8")                        # torchrun inside srun wins
    assert not adopt_slurm_env(environ) and environ["RANK"] == "3"
    batch_shell = {k: v for k, v in step.items() if k != "SLURM_STEP_ID"}  # sbatch / salloc shell: 1 process
    assert not adopt_slurm_env(batch_shell) and "RANK" not in batch_shell
    one_task = dict(step, SLURM_STEP_NUM_TASKS="1", SLURM_NTASKS="1")
    assert not adopt_slurm_env(one_task) and "RANK" not in one_task


@pytest.mark.parametrize("restart, restarts, exists, expected", [
    ("", 0, True, ""),                      # a fresh run ignores an old checkpoint in its work dir
    ("a.pt", 0, True, "a.pt"),
    ("auto", 0, False, ""),
    ("auto", 0, True, "LAST"),
    ("", 1, True, "LAST"),                  # torchrun restarted the workers: this run's latest state
    ("", 1, False, ""),
    ("a.pt", 1, True, "LAST"),
    ("a.pt", 1, False, "a.pt"),             # restarted before this run wrote a checkpoint
])
def test_which_checkpoint_a_run_resumes_from(tmp_path, monkeypatch, restart, restarts, exists, expected):
    import logging
    from argparse import Namespace
    from utils.training.checkpointer import resolve_restart

    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", str(restarts))
    if exists:
        (tmp_path / "checkpoint_last.pt").write_bytes(b"")
    got = resolve_restart(Namespace(restart=restart), tmp_path, logging.getLogger("test"))
    assert got == (str(tmp_path / "checkpoint_last.pt") if expected == "LAST" else expected)
