"""A work directory belongs to one run (issue 13, classes 1-3): a second run on a busy work dir exits at once
with one line naming the holder and touches nothing; a start that fails leaves the work dir byte-identical;
a new run does not replace an earlier run's checkpoints unless told to (--overwrite)."""
import json
import os
import signal
import socket
import time

import pytest
import torch

import cli_runner
from cli_runner import tiny_args
from utils.io.errors import UserError
from utils.io.workdir_lock import WorkDirLock, check_unlocked


def snapshot(folder):
    """Every file under `folder` with its bytes (symbolic links as their target), but the lock file: a refused
    run took the free lock before it looked at the checkpoints, and left its host and pid there."""
    return {str(p.relative_to(folder)): (os.readlink(p) if p.is_symlink() else p.read_bytes())
            for p in sorted(folder.rglob("*")) if (p.is_file() or p.is_symlink()) and p.name != ".lock"}


def in_use(work_dir, pid):
    return (f"error: work dir {work_dir} is in use by another run (host {socket.gethostname()}, pid {pid}); "
            "wait for it to end, stop it, or choose another --work_dir\n")


def over_checkpoints(work_dir, names="checkpoint_best.pt, checkpoint_last.pt"):
    return (f"error: work dir {work_dir} holds the checkpoints of an earlier run ({names}); resume it with "
            f"--restart {work_dir}, choose another --work_dir, or pass --overwrite to start a new run there "
            "(replacing them)\n")


# ---- the lock itself (in one process: flock locks of two open files exclude each other) -------------------------
def test_lock_excludes_a_second_holder_and_names_the_first(tmp_path):
    first = WorkDirLock(tmp_path).acquire()
    with pytest.raises(UserError) as caught:
        WorkDirLock(tmp_path).acquire()
    assert str(caught.value) + "\n" == in_use(tmp_path, os.getpid())[len("error: "):]
    with pytest.raises(UserError):
        check_unlocked(tmp_path)
    first.release()
    check_unlocked(tmp_path)                                  # free again, and --check's probe does not take it
    with WorkDirLock(tmp_path) as second:
        assert second.held
    assert (tmp_path / ".lock").read_text() == f"host {socket.gethostname()}, pid {os.getpid()}\n"


def test_lock_file_that_is_a_symlink_is_not_followed(tmp_path):
    target = tmp_path / "precious"
    target.write_text("keep me")
    work_dir = tmp_path / "run"
    work_dir.mkdir()
    (work_dir / ".lock").symlink_to(target)
    with pytest.raises(UserError, match=r"^cannot create the lock file .*/run/\.lock: .*; check that the work dir is "
                                        r"writable \(--work_dir\)$"):
        WorkDirLock(work_dir).acquire()
    assert target.read_text() == "keep me"


def test_lock_of_a_killed_holder_is_free(tmp_path):
    """The kernel drops an flock with its process: a SIGKILLed holder leaves no stale lock."""
    pid = os.fork()
    if pid == 0:                                               # the child: lock, then wait to be killed
        WorkDirLock(tmp_path).acquire()
        time.sleep(60)
        os._exit(0)
    try:
        deadline = time.monotonic() + 10
        while not (tmp_path / ".lock").is_file() or not (tmp_path / ".lock").read_text():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with pytest.raises(UserError, match=f"pid {pid}\\)"):
            WorkDirLock(tmp_path).acquire()
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    WorkDirLock(tmp_path).acquire().release()


# ---- train.py ------------------------------------------------------------------------------------------------
def wait_for_line(path, text, process, timeout=120):
    deadline = time.monotonic() + timeout
    while text not in (path.read_text() if path.is_file() else ""):
        assert process.is_alive(), "the first run ended before training"
        assert time.monotonic() < deadline, f"no {text!r} in {path} after {timeout} s"
        time.sleep(0.05)


@pytest.mark.slow
def test_second_train_on_a_busy_work_dir_exits_at_once_and_the_first_finishes(demo_corpus, tmp_path):
    work_dir = tmp_path / "run"
    argv = tiny_args(demo_corpus, work_dir, max_step=120, eval_interval=10, log_interval=1, no_test=True)
    first, out, err = cli_runner.start(cli_runner.TRAIN, argv, tmp_path, name="first")
    try:
        wait_for_line(work_dir / "train_log.log", "| epoch", first)
        for name, extra in (("second", []), ("resume", ["--restart", str(work_dir)]), ("overwrite", ["--overwrite"]),
                            ("check", ["--check"])):
            started = time.monotonic()
            second = cli_runner.train(argv + extra, tmp_path, name=name, timeout=60)
            assert time.monotonic() - started < 5, name
            assert (second.returncode, second.stderr, second.stdout) == (2, in_use(work_dir, first.pid), ""), name
    finally:
        first.join(300)
        if first.is_alive():
            first.kill()
    assert first.exitcode == 0, err.read_text()
    log = (work_dir / "train_log.log").read_text()
    assert log.count("Experiment dir") == 1 and "error" not in log.lower()
    steps = [line for line in out.read_text().splitlines() if line.startswith("| epoch")]
    assert len(steps) == 120 and log.count("| epoch") == 120
    assert {"checkpoint_last.pt", "checkpoint_best.pt", "config.yaml"} <= set(os.listdir(work_dir))
    assert not [name for name in os.listdir(work_dir) if name.startswith(".") and name != ".lock"]
    resumed = cli_runner.train(argv + ["--restart", str(work_dir), "--max_step", "125"], tmp_path, name="after")
    assert resumed.returncode == 0, resumed.stderr           # the lock went with the first run
    assert "Resuming from" in resumed.stdout


@pytest.fixture
def finished_run(demo_corpus, tmp_path):
    """A work dir after a finished run: (its flags, its folder, its files)."""
    work_dir = tmp_path / "run"
    argv = tiny_args(demo_corpus, work_dir, max_step=10, eval_interval=5, no_test=True)
    done = cli_runner.train(argv, tmp_path, name="earlier")
    assert done.returncode == 0, done.stderr
    return argv, work_dir, snapshot(work_dir)


def test_failed_starts_leave_the_work_dir_byte_identical(finished_run, tmp_path):
    argv, work_dir, before = finished_run
    assert {"train_log.log", "config.yaml", "checkpoint_last.pt", "checkpoint_best.pt"} <= set(before)
    resume = argv + ["--restart", str(work_dir)]
    missing = tmp_path / "missing"
    cases = {
        "bad data": (resume + ["--data", str(missing)], f"error: {missing}: data folder not found; download "
                     "the dataset with getdata.sh or pass --data"),
        "batch split": (resume + ["--batch_chunk", "3"], "error: --batch_size (16) must be divisible by "
                        "--batch_chunk (3)"),
        "unknown flag": (resume + ["--lr_x", "1"], None),
        "missing checkpoint": (argv + ["--restart", str(tmp_path / "nope.pt")],
                               f"error: checkpoint {tmp_path / 'nope.pt'} does not exist; pass the path of a .pt "
                               "file written by train.py"),
        "new run over checkpoints": (argv, over_checkpoints(work_dir).rstrip("\n")),
    }
    for name, (flags, line) in cases.items():
        failed = cli_runner.train(flags, tmp_path, name=name.replace(" ", "_"))
        assert failed.returncode == 2, name
        if line is None:                                       # argparse's line: its wording is argparse's
            assert failed.stderr.startswith("error: ") and len(failed.stderr.splitlines()) == 1, name
        else:
            assert failed.stderr == line + "\n", name
        assert snapshot(work_dir) == before, name


def test_new_run_over_checkpoints_is_refused_and_overwrite_starts_afresh(finished_run, tmp_path):
    argv, work_dir, before = finished_run
    check = cli_runner.train(argv + ["--check"], tmp_path, name="check")  # the recipes' check says it once
    assert (check.returncode, check.stderr) == (2, over_checkpoints(work_dir))
    refused = cli_runner.train(argv, tmp_path, name="refused")
    assert (refused.returncode, refused.stderr, refused.stdout) == (2, over_checkpoints(work_dir), "")
    assert snapshot(work_dir) == before

    fresh = cli_runner.train(argv + ["--overwrite", "--lr", "0.02"], tmp_path, name="fresh")
    assert fresh.returncode == 0, fresh.stderr
    after = snapshot(work_dir)
    assert after["train_log.log"].startswith(before["train_log.log"])        # appended, not truncated
    assert after["train_log.log"].count(b"Experiment dir") == 2
    assert after["config.1.yaml"] == before["config.yaml"]                   # the earlier configuration kept
    assert b"lr: 0.02" in after["config.yaml"] and b"overwrite" not in after["config.yaml"]
    assert "--overwrite: deleted checkpoint_last.pt of an earlier run" in fresh.lines
    assert after["checkpoint_last.pt"] != before["checkpoint_last.pt"]
    # the earlier run's JSON metrics are kept whole beside this run's own file, which starts afresh
    assert after["train_log.1.json"] == before["train_log.json"]
    records = [json.loads(line) for line in after["train_log.json"].splitlines()]
    assert [r["step"] for r in records].count("PARAMETER") == 1 and records[0]["lr"] == 0.02
    assert "Kept the earlier run's metrics of this work dir as train_log.1.json" in fresh.lines


def test_restart_from_elsewhere_into_a_work_dir_with_checkpoints_is_refused(finished_run, tmp_path):
    """--restart OTHER/checkpoint_last.pt with a --work_dir that holds another run's checkpoints would replace
    them at the first save: refused with one line before anything is touched, unless --overwrite."""
    argv, work_dir, before = finished_run
    other = tmp_path / "other"
    done = cli_runner.train(tiny_args(argv[argv.index("--data") + 1], other, max_step=5, eval_interval=5,
                                      no_test=True), tmp_path, name="other")
    assert done.returncode == 0, done.stderr
    source = other / "checkpoint_last.pt"
    refused = cli_runner.train(argv + ["--restart", str(source), "--max_step", "15"], tmp_path, name="elsewhere")
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr == (
        f"error: work dir {work_dir} holds the checkpoints of another run (checkpoint_best.pt, checkpoint_last.pt) "
        f"and --restart {source} continues a checkpoint from elsewhere, whose saves would replace them; resume "
        f"this work dir's own run with --restart {work_dir}, choose another --work_dir, or pass --overwrite to "
        "replace them\n")
    assert snapshot(work_dir) == before
    # its own checkpoint, by file or by folder, is a resume of this work dir
    own = cli_runner.train(argv + ["--restart", str(work_dir / "checkpoint_last.pt"), "--max_step", "12"],
                           tmp_path, name="own")
    assert own.returncode == 0, own.stderr
    replaced = cli_runner.train(argv + ["--restart", str(source), "--max_step", "10", "--overwrite"], tmp_path,
                                name="replaced")
    assert replaced.returncode == 0, replaced.stderr
    assert "--overwrite: deleted checkpoint_last.pt of an earlier run" in replaced.lines
    assert torch.load(work_dir / "checkpoint_last.pt", weights_only=True)["train_step"] == 10
    assert (work_dir / "train_log.1.json").is_file()                  # the earlier records kept


def test_resumes_append_to_the_log_and_keep_each_earlier_configuration(finished_run, tmp_path):
    argv, work_dir, before = finished_run
    configs = [before["config.yaml"]]
    for stop in (15, 20):
        done = cli_runner.train(argv + ["--restart", str(work_dir), "--max_step", str(stop)], tmp_path, name=f"r{stop}")
        assert done.returncode == 0, done.stderr
        configs.append((work_dir / "config.yaml").read_bytes())
    after = snapshot(work_dir)
    assert after["train_log.log"].startswith(before["train_log.log"])
    assert after["train_log.log"].count(b"Experiment dir") == 3
    assert [after["config.1.yaml"], after["config.2.yaml"], after["config.yaml"]] == configs
    assert b"max_step: 20\n" in configs[2] and len(set(configs)) == 3
    # resumes continue the run's JSON metrics: every record of the earlier part is still there, in order
    assert after["train_log.json"].startswith(before["train_log.json"])
    assert [json.loads(line)["step"] for line in after["train_log.json"].splitlines()].count("PARAMETER") == 3


def test_the_same_configuration_again_is_kept_once(tmp_path):
    """A requeued job (run.sub: the same command line again) leaves one config.yaml, not a copy per requeue."""
    import logging
    from utils.config.cli import parse_args, train_parser
    from utils.training.run_setup import record_config
    args = parse_args(train_parser(), ["--work_dir", str(tmp_path), "--restart", "auto"])
    log = logging.getLogger("test")
    first = record_config(args, tmp_path, log).read_bytes()
    record_config(args, tmp_path, log)
    assert sorted(os.listdir(tmp_path)) == ["config.yaml"] and (tmp_path / "config.yaml").read_bytes() == first
    record_config(args.replace(lr=0.5), tmp_path, log)
    assert (tmp_path / "config.1.yaml").read_bytes() == first and sorted(os.listdir(tmp_path)) == [
        "config.1.yaml", "config.yaml"]


def test_a_resume_without_checkpoint_last_resumes_the_newest_left_not_a_fresh_start(finished_run, tmp_path):
    """checkpoint_last.pt deleted (or a kill between the files of the first save): --restart <work_dir> resumes
    from the newest checkpoint left instead of starting afresh over checkpoint_best.pt."""
    argv, work_dir, before = finished_run
    (work_dir / "checkpoint_last.pt").unlink()
    best_step = torch.load(work_dir / "checkpoint_best.pt", weights_only=True)["train_step"]
    resumed = cli_runner.train(argv + ["--restart", str(work_dir), "--max_step", "12"], tmp_path, name="resumed")
    assert resumed.returncode == 0, resumed.stderr
    assert (f"No checkpoint_last.pt in {work_dir}: resuming from checkpoint_best.pt, the newest checkpoint there"
            in resumed.lines)
    assert f"Resuming from {work_dir / 'checkpoint_best.pt'} at step {best_step}" in resumed.lines
    assert torch.load(work_dir / "checkpoint_last.pt", weights_only=True)["train_step"] == 12


@pytest.mark.parametrize("where", ["work_dir", "cache_dir", "log"])
def test_a_file_or_folder_in_the_way_is_one_line(demo_corpus, tmp_path, where):
    """--work_dir or --cache_dir naming a file, a folder where the log goes: one line, exit 2, no traceback."""
    work_dir, cache_dir = tmp_path / "work", tmp_path / "cache"
    if where == "work_dir":
        work_dir.write_text("a file")
        expected = (f"error: cannot create the work dir {work_dir}: a file is in the way (a folder is needed "
                    "there); choose another --work_dir")
    elif where == "cache_dir":
        cache_dir.write_text("a file")
        expected = "error: cannot create the dataset cache folder "
    else:
        (work_dir / "train_log.log").mkdir(parents=True)
        expected = f"error: cannot write {work_dir / 'train_log.log'}: is a directory; remove what is in the way"
    result = cli_runner.train(tiny_args(demo_corpus, work_dir, max_step=2, cache_dir=cache_dir), tmp_path)
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith(expected), result.stderr
