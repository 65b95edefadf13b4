"""run.sub on a real Slurm cluster: a 2-task training job, and a job preempted with SIGUSR1 that requeues
itself, resumes and ends exactly where the uninterrupted job ended.

They need a running cluster with room for 2 tasks on one node: CI starts one on its machine with
scripts/ci/start_slurm.sh. Elsewhere (no sbatch, no cluster) they are skipped, except under CI=true, where a
missing cluster is an error. The jobs run train.py through run.sub and run_multinode_wt103_large.sh with
the tiny demo model (the extra flags after `run.sub train` override the wt103 preset).
"""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dist_testlib import REPO, TINY, last_checkpoint, max_weight_difference, step_losses, summary, wait_for
from utils.data.demo_corpus import write_demo_corpus

STEPS = 30
TOL = 1e-5


def cluster_problem() -> str | None:
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return "no Slurm client tools (sbatch, sinfo); CI starts a cluster with scripts/ci/start_slurm.sh"
    try:
        states = subprocess.run(["sinfo", "--noheader", "-o", "%T %c"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "sinfo does not answer: no slurmctld running"
    if states.returncode != 0:
        return f"no Slurm cluster answers ({states.stderr.strip()[:200]})"
    if not any(line.split()[0] in ("idle", "mixed") and int(line.split()[1].rstrip("+")) >= 2
               for line in states.stdout.splitlines() if line.strip()):
        return f"no idle Slurm node with 2 CPUs (sinfo: {states.stdout.strip()[:200]})"
    return None


@pytest.fixture(scope="module")
def slurm():
    problem = cluster_problem()
    if problem:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the Slurm tests, but {problem}")
        pytest.skip(problem)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_demo_corpus(tmp_path_factory.mktemp("demo"), n_train_docs=100, n_eval_docs=10)


def submit(work_dir: Path, data: Path, *, wait: bool) -> subprocess.CompletedProcess:
    """sbatch run.sub train with 2 tasks on 1 node; the demo model's flags go after `train`."""
    env = dict(os.environ, WORK_DIR=str(work_dir), PYTHON=sys.executable, CONFIG="demo", MAX_STEP=str(STEPS),
               OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_JOB_ID"):
        env.pop(key, None)
    cmd = ["sbatch", "--nodes", "1", "--ntasks-per-node", "2", "--time", "10", "--job-name", "txl-test",
           "--output", str(work_dir / "slurm-%j.out"), "--parsable"]
    if wait:
        cmd.append("--wait")
    cmd += ["run.sub", "train", *TINY, "--data", str(data), "--dropout", "0.1"]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=420)


def job_id(result: subprocess.CompletedProcess) -> str:
    match = re.match(r"(\d+)", result.stdout.strip())
    assert match, f"sbatch printed no job ID: {result.stdout} {result.stderr}"
    return match.group(1)


def job_field(job: str, field: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, timeout=20).stdout
    match = re.search(rf"\b{field}=(\S+)", out)
    return match.group(1) if match else ""


@pytest.fixture(scope="module")
def uninterrupted(slurm, data, tmp_path_factory):
    work = tmp_path_factory.mktemp("slurm_job")
    result = submit(work, data, wait=True)
    job = job_id(result)
    output = (work / f"slurm-{job}.out").read_text() if (work / f"slurm-{job}.out").is_file() else ""
    assert result.returncode == 0, f"{result.stderr}\n{output[-4000:]}"
    return work, job, output


@pytest.mark.slow
def test_run_sub_trains_with_two_tasks(uninterrupted):
    work, job, output = uninterrupted
    results = work / "results" / job
    assert "world size: 2 (ddp)" in output, output[-3000:]
    assert "| End of training | test time:" in output
    assert (results / "checkpoint_last.pt").is_file() and (results / "checkpoint_best.pt").is_file()
    ckpt = last_checkpoint(results)
    assert ckpt["train_step"] == STEPS and ckpt["world_size"] == 2
    assert ckpt["args"]["max_step"] == STEPS                      # MAX_STEP from the environment reached train.py
    assert ckpt["args"]["n_layer"] == 2 and ckpt["args"]["dropout"] == 0.1   # so did the flags after `train`
    assert summary(results)["test_loss"] > 0
    assert sorted(step_losses(results)) == list(range(1, STEPS + 1))


@pytest.mark.slow
def test_preempted_job_requeues_and_resumes_exactly(uninterrupted, data, tmp_path):
    reference = uninterrupted[0] / "results" / uninterrupted[1]
    submitted = submit(tmp_path, data, wait=False)
    assert submitted.returncode == 0, submitted.stderr
    job = job_id(submitted)
    results = tmp_path / "results" / job
    try:
        wait_for(lambda: max(step_losses(results), default=0) >= 3, 240, "the job to train a few steps", poll=0.1)
        subprocess.run(["scancel", "--signal=USR1", job], check=True, timeout=30)
        wait_for(lambda: int(job_field(job, "Restarts") or 0) >= 1, 120, "the job to requeue itself", poll=0.5)
        wait_for(lambda: job_field(job, "JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), 300,
                 "the requeued job to finish", poll=1.0)
    finally:
        if job_field(job, "JobState") in ("PENDING", "RUNNING", "REQUEUED"):
            subprocess.run(["scancel", job], timeout=30)
    output = (tmp_path / f"slurm-{job}.out").read_text()
    assert job_field(job, "JobState") == "COMPLETED", output[-4000:]
    assert "Received SIGUSR1, exiting after saving the checkpoint" in output, output[-4000:]
    assert "requeueing job" in output
    stopped = re.search(r"Resuming from \S+checkpoint_last.pt at step (\d+)", output)
    assert stopped and 3 <= int(stopped.group(1)) < STEPS, output[-4000:]
    assert last_checkpoint(results)["train_step"] == STEPS
    diff = max_weight_difference(last_checkpoint(results)["model_state"], last_checkpoint(reference)["model_state"])
    assert diff <= TOL, f"final weights differ from the uninterrupted job's by {diff:.3g}"
    ours, theirs = step_losses(results), step_losses(reference)
    assert abs(ours[STEPS] - theirs[STEPS]) <= TOL
    assert abs(summary(results)["test_loss"] - summary(reference)["test_loss"]) <= TOL
