"""run.sub's command lines without a cluster: stand-in `srun` and `scontrol` on PATH record what run.sub asks
of them (the real Slurm runs are in test_slurm.py). Covers what a Slurm test on one machine cannot: the pyxis
container options, `all` mode, the reference's environment variables, and the requeue decision."""
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

FAKE_SRUN = """#!/bin/bash
if [[ $* == *" --check "* ]]; then                 # the one-task check step before the tasks start
    printf '%s LOCAL_WORLD_SIZE=%s\\n' "$*" "$LOCAL_WORLD_SIZE" >> "$FAKE_LOG/check"
    exit ${FAKE_CHECK_STATUS:-0}
fi
printf '%s\\n' "$*" >> "$FAKE_LOG/srun"
if [[ -n ${FAKE_PREEMPT:-} && $* == *" train "* ]]; then
    mkdir -p "$WORK_DIR/results/$SLURM_JOB_ID"
    echo "stopped by SIGUSR1 after step 7 with a checkpoint" > "$WORK_DIR/results/$SLURM_JOB_ID/preempted"
fi
exit ${FAKE_STATUS:-0}
"""
FAKE_SCONTROL = """#!/bin/bash
printf '%s\\n' "$*" >> "$FAKE_LOG/scontrol"
if [[ $1 == show && $2 == hostnames ]]; then printf 'gpu07\\ngpu08\\n'; fi
exit ${FAKE_REQUEUE_STATUS:-0}
"""


@pytest.fixture
def slurm_stub(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)

    def run_sub(*args, **env_extra):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_"))}
        env.update(PATH=f"{bin_dir}:{env['PATH']}", FAKE_LOG=str(tmp_path), WORK_DIR=str(tmp_path / "work"),
                   SLURM_JOB_ID="4242", SLURM_SUBMIT_DIR=str(REPO), SLURM_JOB_NODELIST="gpu[07-08]",
                   SLURM_JOB_NUM_NODES="2", SLURM_NTASKS="32")
        for key in ("CONFIG", "FP16", "MAX_STEP", "CONT", "EVAL_BATCH_SIZE", "LR"):
            env.pop(key, None)
        env.update(env_extra)
        result = subprocess.run(["bash", "run.sub", *args], cwd=REPO, env=env, capture_output=True, text=True,
                                timeout=60)
        calls = {name: (tmp_path / name).read_text().splitlines() if (tmp_path / name).exists() else []
                 for name in ("srun", "check", "scontrol")}
        return result, calls
    return run_sub


def test_plain_srun_gets_the_recipe_the_environment_flags_and_the_extra_flags(slurm_stub, tmp_path):
    result, calls = slurm_stub("train", "--max_step", "10", "--data", "my data/", CONFIG="4dgx2_16gpu_fp16",
                               FP16="1", LR="0.02", EVAL_BATCH_SIZE="64")
    assert result.returncode == 0, result.stderr
    results = tmp_path / "work" / "results" / "4242"
    assert calls["srun"] == [
        f"--kill-on-bad-exit=1 --mpi=none --chdir {REPO} bash run_multinode_wt103_large.sh train --work_dir {results} "
        "--restart auto --config 4dgx2_16gpu_fp16 --fp16 --eval_batch_size 64 --lr 0.02 --max_step 10 --data my data/"]
    assert results.is_dir()
    assert "rendezvous gpu07:" in result.stdout                    # the first node of the allocation
    assert "requeue" not in " ".join(calls["scontrol"])


def test_one_task_checks_the_flags_before_the_tasks_start(slurm_stub, tmp_path):
    result, calls = slurm_stub("all", "--max_step", "10", CONFIG="4dgx2_16gpu_fp16", SLURM_NTASKS_PER_NODE="16(x2)")
    assert result.returncode == 0, result.stderr
    results = tmp_path / "work" / "results" / "4242"
    assert calls["check"] == [
        f"--kill-on-bad-exit=1 --mpi=none --chdir {REPO} --ntasks=1 --nodes=1 --quiet bash run_multinode_wt103_large.sh "
        f"train --work_dir {results} --restart auto --config 4dgx2_16gpu_fp16 --max_step 10 --check 32 "
        "LOCAL_WORLD_SIZE=16",
        f"--kill-on-bad-exit=1 --mpi=none --chdir {REPO} --ntasks=1 --nodes=1 --quiet bash run_multinode_wt103_large.sh "
        f"eval --work_dir {results} --config 4dgx2_16gpu_fp16 --max_step 10 --check 32 LOCAL_WORLD_SIZE=16"]


def test_a_failed_check_starts_no_task(slurm_stub):
    result, calls = slurm_stub("train", FAKE_CHECK_STATUS="2")
    assert result.returncode == 2 and calls["srun"] == [] and len(calls["check"]) == 1
    result, calls = slurm_stub("train", SLURM_NTASKS="3", SLURM_JOB_NUM_NODES="2")   # no tasks-per-node variable
    assert calls["check"][-1].endswith("--check 3 LOCAL_WORLD_SIZE=2")


def test_all_mode_trains_then_evaluates_with_the_eval_flags(slurm_stub, tmp_path):
    result, calls = slurm_stub("all", CONFIG="8dgx2_16gpu_fp32", EVAL_BATCH_SIZE="128", MAX_STEP="5")
    assert result.returncode == 0, result.stderr
    train, evaluate = calls["srun"]
    assert " train " in train and "--max_step 5" in train and "--eval_batch_size 128" in train
    assert evaluate.endswith(f"bash run_multinode_wt103_large.sh eval --work_dir {tmp_path / 'work/results/4242'} "
                             "--config 8dgx2_16gpu_fp32 --batch_size 128")


def test_container_mode_uses_pyxis_options(slurm_stub, tmp_path):
    result, calls = slurm_stub("train", CONT="registry/txl:latest")
    assert result.returncode == 0, result.stderr
    work = tmp_path / "work"
    assert calls["srun"] == [
        "--kill-on-bad-exit=1 --mpi=none --container-image registry/txl:latest --container-mounts "
        f"{work}/data:/workspace/transformer-xl/data,{work}/results:/workspace/transformer-xl/results "
        "--container-workdir /workspace/transformer-xl bash run_multinode_wt103_large.sh train "
        "--work_dir /workspace/transformer-xl/results/4242 --restart auto"]


def test_preempted_training_requeues_the_job_and_skips_eval(slurm_stub):
    result, calls = slurm_stub("all", FAKE_PREEMPT="1")
    assert result.returncode == 0, result.stderr
    assert calls["scontrol"][-1] == "requeue 4242"
    assert len(calls["srun"]) == 1                                 # no evaluation of an unfinished model
    assert "stopped by SIGUSR1 after step 7" in result.stdout


def test_failed_requeue_says_how_to_resume(slurm_stub):
    result, _ = slurm_stub("train", FAKE_PREEMPT="1", FAKE_REQUEUE_STATUS="1")
    assert result.returncode == 1
    assert "could not requeue" in result.stderr and "--restart" in result.stderr


def test_failed_training_is_not_requeued_and_keeps_its_exit_code(slurm_stub):
    result, calls = slurm_stub("all", FAKE_STATUS="3")
    assert result.returncode == 3
    assert len(calls["srun"]) == 1 and "requeue 4242" not in calls["scontrol"]


def test_bad_mode_and_missing_slurm_are_one_line_errors(slurm_stub):
    result, calls = slurm_stub("trian")
    assert result.returncode == 2 and "takes train, eval or all" in result.stderr and not calls["srun"]
    result, calls = slurm_stub("train", SLURM_JOB_ID="")
    assert result.returncode == 2 and "submit it with sbatch" in result.stderr and not calls["srun"]
