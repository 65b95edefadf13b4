"""Helpers of the multi-process tests: a tiny training run, launched as one process, under torchrun, or as
ranks started by hand (the way Slurm's srun starts them), and readers of what a run wrote."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent

# A 2-layer model on the demo corpus: global batch 8, no dropout (each rank would draw its own masks, so
# runs with different numbers of processes could not match), a checkpoint every 10 steps, short evaluations.
# Segment, memory and learning rate are pinned here, not taken from the demo preset (tuned for scripts/demo.py).
TINY = ["--config_file", "configs/cpu_small.yaml", "--config", "demo", "--no_cuda", "--dropout", "0",
        "--batch_size", "8", "--eval_batch_size", "8", "--log_interval", "1", "--eval_interval", "10",
        "--eval_max_steps", "4", "--warmup_step", "5", "--tgt_len", "32", "--mem_len", "32", "--eval_tgt_len", "32",
        "--lr", "0.01"]


def env(**extra) -> dict:
    out = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT",
                "SLURM_STEP_ID", "SLURM_PROCID", "SLURM_JOB_ID"):
        out.pop(key, None)
    out.update({k: str(v) for k, v in extra.items()})
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_cmd(data: Path, work_dir: Path, *extra: str) -> list[str]:
    return ["train.py", *TINY, "--data", str(data), "--work_dir", str(work_dir), *extra]


def run(cmd: list[str], timeout: float, **env_extra) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=REPO, env=env(**env_extra), capture_output=True, text=True, timeout=timeout)
    return result


def python_train(data: Path, work_dir: Path, *extra: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return run([sys.executable, *train_cmd(data, work_dir, *extra)], timeout)


def torchrun(nproc: int, data: Path, work_dir: Path, *extra: str, launcher=(), timeout: float = 180,
             background: bool = False):
    cmd = [sys.executable, "-m", "torch.distributed.run", *launcher, f"--nproc_per_node={nproc}",
           *train_cmd(data, work_dir, *extra)]
    if not launcher:
        cmd[3:3] = ["--standalone"]
    if background:
        return subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return run(cmd, timeout)


def start_ranks(world_size: int, data: Path, work_dir: Path, *extra: str, timeout_s: float = 60) -> list:
    """`world_size` processes started by hand with RANK/WORLD_SIZE/MASTER_* (as srun + run.sub start them)."""
    port = free_port()
    procs = []
    for rank in range(world_size):
        procs.append(subprocess.Popen(
            [sys.executable, *train_cmd(data, work_dir, "--dist_timeout", str(timeout_s), *extra)], cwd=REPO,
            env=env(RANK=rank, WORLD_SIZE=world_size, LOCAL_RANK=rank, MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def wait_all(procs: list, timeout: float) -> list[tuple[int, str, str]]:
    deadline = time.time() + timeout
    out = []
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise AssertionError(f"processes still running after {timeout} s (a hang)")
        out.append((p.returncode, stdout, stderr))
    return out


def wait_for(predicate, timeout: float, what: str, poll: float = 0.02):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def records(work_dir: Path) -> list[dict]:
    path = work_dir / "train_log.json"
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def step_losses(work_dir: Path) -> dict[int, float]:
    """train_loss by step (the last record of a step wins: a resumed run repeats the steps after its checkpoint)."""
    return {r["step"]: r["train_loss"] for r in records(work_dir) if isinstance(r["step"], int) and "train_loss" in r}


def valid_losses(work_dir: Path) -> dict[int, float]:
    return {r["step"]: r["valid_loss"] for r in records(work_dir) if isinstance(r["step"], int) and "valid_loss" in r}


def summary(work_dir: Path) -> dict:
    found = [r for r in records(work_dir) if r["step"] == "SUMMARY"]
    return found[-1] if found else {}


def last_checkpoint(work_dir: Path) -> dict:
    return torch.load(work_dir / "checkpoint_last.pt", map_location="cpu", weights_only=True)


def max_weight_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), f"different parameter names: {sorted(a.keys() ^ b.keys())}"
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def children(pid: int) -> list[int]:
    """Direct child processes of `pid` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


def env_of(pid: int) -> dict:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def worker_pid(agent_pid: int, rank: int) -> int | None:
    """The pid of torchrun's worker of global rank `rank`."""
    for pid in children(agent_pid):
        if env_of(pid).get("RANK") == str(rank):
            return pid
    return None


def kill_quietly(proc) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
