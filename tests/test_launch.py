"""scripts/launch.py, the recipes' torchrun: a process that fails mid-run ends the job with one line naming its
rank, its message and its exit status; the launcher's traceback and "Root Cause" table go to a log file; the
processes stopped because of it print nothing."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cli_runner import tiny_args
from conftest import REPO

pytestmark = pytest.mark.slow


def launch(demo_corpus, tmp_path, fault: str) -> subprocess.CompletedProcess:
    argv = tiny_args(demo_corpus, tmp_path / "work", max_step=30, eval_interval=10, log_interval=1,
                     multi_gpu="ddp", no_env=True)
    env = dict(os.environ, FAULT=fault, FAULT_RANK="1", FAULT_STEP="4", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(REPO / "scripts" / "launch.py"), "--standalone",
                           "--nproc_per_node=2", str(REPO / "tests" / "fault_train.py"), *argv],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)


def the_one_line(result) -> str:
    output = result.stdout + result.stderr
    lines = [line for line in output.splitlines() if line.strip()]
    ended = [line for line in lines if line.startswith("error: rank")]
    assert len(ended) == 1 and lines[-1] == ended[0], output[-3000:]
    for noise in ("Root Cause", "ChildFailedError", "another process of the job failed", "closing signal"):
        assert noise not in output, output[-3000:]
    log = Path(re.search(r"\(launcher log: (\S+)\)$", ended[0])[1])
    assert "FAILED" in log.read_text()                       # torchrun's report is kept there
    return ended[0]


def test_a_killed_rank_is_named_with_its_signal(demo_corpus, tmp_path):
    result = launch(demo_corpus, tmp_path, "kill")
    line = the_one_line(result)
    assert result.returncode == 128 + 9
    assert line.startswith("error: rank 1 failed, killed by SIGKILL (as the kernel's out-of-memory killer does) "
                           "(launcher log: ")
    assert "| epoch   1 step        3 |" in result.stdout          # it trained before the fault


def test_a_rank_that_raises_is_named_with_its_message(demo_corpus, tmp_path):
    result = launch(demo_corpus, tmp_path, "raise")
    line = the_one_line(result)
    assert result.returncode == 1
    assert line.startswith("error: rank 1 failed, exit status 1: RuntimeError: injected fault in the training step")
    assert "Traceback" in result.stderr                      # the rank's own traceback: a bug is reported as one


def test_bad_input_on_one_rank_is_its_one_line(demo_corpus, tmp_path):
    result = launch(demo_corpus, tmp_path, "user")
    line = the_one_line(result)
    assert result.returncode == 2
    assert line.startswith("error: rank 1 failed, exit status 2: injected bad input on one process (launcher log: ")
    assert "Traceback" not in result.stdout + result.stderr
