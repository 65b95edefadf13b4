"""--check N: train.py and eval.py check once, in one process, what each of N processes would check alike, and
start nothing (the recipes and run.sub run it before torchrun / srun; tests/test_recipes.py, test_run_sub.py)."""
import pytest
import torch

import cli_runner
from cli_runner import tiny_args
from utils.io.errors import UserError
from utils.runtime.device import check_process_count


def gpus(monkeypatch, count: int):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def test_more_processes_than_gpus_is_refused(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    gpus(monkeypatch, 4)
    assert check_process_count(4, None) is None and check_process_count(2, True) is None
    with pytest.raises(UserError, match=r"^8 processes but 4 GPU\(s\) visible: start one process per GPU \(4\), or "
                                        r"pass --no_cuda to run CPU processes$"):
        check_process_count(8, None)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")          # 32 tasks, 4 on each node: fits
    assert check_process_count(32, None) is None


def test_several_cpu_processes_get_a_note(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    gpus(monkeypatch, 0)
    assert check_process_count(1, None) is None
    assert check_process_count(8, True) == "note: no GPU found: starting 8 CPU processes (gloo, 1 thread(s) each)"
    gpus(monkeypatch, 2)
    assert check_process_count(8, False) == "note: --no_cuda: starting 8 CPU processes (gloo, 1 thread(s) each)"


def test_train_check_passes_and_writes_nothing(demo_corpus, tmp_path):
    work_dir = tmp_path / "work"
    result = cli_runner.train([*tiny_args(demo_corpus, work_dir), "--check", "2"], tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("note: no GPU found: starting 2 CPU processes (gloo, "), lines
    assert result.stdout == "" and not work_dir.exists()


@pytest.mark.parametrize("flags, error", [
    (["--check", "3"], "--batch_size 16 does not split evenly over 3 processes"),
    (["--check", "2", "--data", "nowhere"], "nowhere: data folder not found"),
    (["--check", "2", "--dataset", "lm1b"], "no training shards found"),
    (["--check", "2", "--restart", "gone.pt"], "checkpoint gone.pt does not exist"),
])
def test_train_check_errors(demo_corpus, tmp_path, flags, error):
    result = cli_runner.train([*tiny_args(demo_corpus, tmp_path / "work"), *flags], tmp_path)
    lines = result.stderr.splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and error in lines[0], \
        result.stderr
    assert not (tmp_path / "work").exists()


def test_eval_check_reads_the_data_folder_from_the_checkpoint(demo_corpus, tmp_path):
    trained = cli_runner.train(tiny_args(demo_corpus, tmp_path / "work", max_step=2, eval_interval=2, no_test=True),
                               tmp_path, name="train")
    assert trained.returncode == 0, trained.stderr
    checkpoint = tmp_path / "work" / "checkpoint_last.pt"
    ok = cli_runner.evaluate(["--model", checkpoint, "--check", "1", "--work_dir", tmp_path / "eval"], tmp_path,
                             name="ok")
    assert ok.returncode == 0 and ok.stderr == "", ok.stderr
    assert not (tmp_path / "eval").exists()
    moved = cli_runner.evaluate(["--model", checkpoint, "--check", "1", "--data", tmp_path / "moved"], tmp_path,
                                name="moved")
    assert moved.returncode == 2 and moved.stderr.strip() == (
        f"error: {tmp_path / 'moved'}: data folder not found; download the dataset with getdata.sh or pass --data")
