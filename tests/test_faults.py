"""Faults while files are written (issue 13): a SIGKILL at any point of a checkpoint save loses nothing, a full
disk or a read-only directory is one line naming the file, and a damaged dataset cache is rebuilt."""
import contextlib
import errno
import json
import os
import shutil
import signal

import numpy as np
import pytest
import torch

import cli_runner
from cli_runner import tiny_args

# ----------------------------------------------------------------------------------------------------------
# hooks (run in the train.py child by cli_runner; module-level so that the forkserver can import them)


def kill_at_write(name: str, nth: int, moment: str) -> None:
    """SIGKILL on the `nth` write of the file called `name` through utils.io.atomic (torch.save or a copy):
    `moment` "during": its data is complete in the temporary file but not yet renamed onto `name`; "after":
    right after the rename, before whatever the saver does next."""
    from utils.io import atomic
    original = atomic.atomic_open
    count = [0]

    @contextlib.contextmanager
    def killing_open(path, *args, **kwargs):
        if os.path.basename(path) != name:
            with original(path, *args, **kwargs) as f:
                yield f
            return
        count[0] += 1
        with original(path, *args, **kwargs) as f:
            yield f
            if count[0] == nth and moment == "during":
                f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
        if count[0] == nth:
            os.kill(os.getpid(), signal.SIGKILL)
    atomic.atomic_open = killing_open


# ----------------------------------------------------------------------------------------------------------
# class 4: a kill at any point of a save


def _weights(path):
    ckpt = torch.load(path, weights_only=True)
    return ckpt["train_step"], ckpt["best_val_loss"], ckpt["model_state"], ckpt["optimizer_state"]


def _assert_same_checkpoint(a, b):
    step_a, best_a, model_a, optim_a = _weights(a)
    step_b, best_b, model_b, optim_b = _weights(b)
    assert (step_a, best_a) == (step_b, best_b)
    assert model_a.keys() == model_b.keys()
    for key in model_a:
        assert torch.equal(model_a[key], model_b[key]), key
    for index, state in optim_a["state"].items():
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(optim_b["state"][index][key])), (index, key)


@pytest.fixture(scope="module")
def uninterrupted(demo_corpus, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("whole")
    result = cli_runner.train(tiny_args(demo_corpus, tmp / "work", max_step=20, eval_interval=5, no_test=True),
                              tmp, name="whole")
    assert result.returncode == 0, result.stderr
    return tmp / "work"


@pytest.mark.parametrize("name,moment", [("checkpoint_best.pt", "during"), ("checkpoint_best.pt", "after"),
                                         ("checkpoint_last.pt", "during")])
def test_a_kill_while_saving_then_resuming_ends_with_the_uninterrupted_checkpoints(demo_corpus, tmp_path,
                                                                                 uninterrupted, name, moment):
    """Killed at the last save (step 20, a new best validation loss) while or right after checkpoint_best.pt
    (or checkpoint_last.pt) is written, then resumed: checkpoint_last.pt and checkpoint_best.pt equal the
    uninterrupted run's bit for bit. Before issue 13, last was written first: a kill before the copy to best
    left last at step 20 with the step-20 best loss and best at step 15, and the resumed run (at max_step
    already) never wrote the best again."""
    work = tmp_path / "work"
    argv = tiny_args(demo_corpus, work, max_step=20, eval_interval=5, no_test=True)
    killed = cli_runner.train(argv, tmp_path, name="killed", hook=kill_at_write, hook_args=(name, 4, moment))
    assert killed.returncode == -signal.SIGKILL
    assert torch.load(work / "checkpoint_last.pt", weights_only=True)["train_step"] == 15
    assert torch.load(uninterrupted / "checkpoint_best.pt", weights_only=True)["train_step"] == 20   # a new best

    resumed = cli_runner.train(argv + ["--restart", str(work)], tmp_path, name="resumed")
    assert resumed.returncode == 0, resumed.stderr
    assert f"Resuming from {work} at step 15" in resumed.lines
    for file in ("checkpoint_last.pt", "checkpoint_best.pt"):
        _assert_same_checkpoint(work / file, uninterrupted / file)


def kill_after_step(step: int) -> None:
    """Hook: SIGKILL right after optimizer step `step` (not at a save: the work since the last one is lost)."""
    cli_runner.signal_after_step(step, "SIGKILL")


def test_a_loop_of_kills_at_random_moments_ends_with_the_uninterrupted_checkpoints(demo_corpus, tmp_path,
                                                                                   uninterrupted):
    """Kill after a random step or during / after a random checkpoint write, resume with the same command,
    until a run finishes: checkpoint_last.pt and checkpoint_best.pt equal the uninterrupted run's bit for bit."""
    import random
    rng = random.Random(13)
    work = tmp_path / "work"
    argv = tiny_args(demo_corpus, work, max_step=20, eval_interval=5, no_test=True, restart=work)
    for run in range(12):
        if rng.random() < 0.3:
            hook, hook_args = kill_after_step, (rng.randint(1, 20),)
        else:
            hook, hook_args = kill_at_write, (rng.choice(["checkpoint_best.pt", "checkpoint_last.pt"]),
                                              rng.randint(1, 2), rng.choice(["during", "after"]))
        result = cli_runner.train(argv, tmp_path, name=f"run{run}", hook=hook, hook_args=hook_args)
        # exit 1: "Loaded checkpoint after 20 steps" (the kill came after the final save was complete)
        if result.returncode == 0 or (result.returncode == 1 and "Loaded checkpoint after 20 steps" in result.stdout):
            break
        assert result.returncode == -signal.SIGKILL, result.stderr
    else:
        pytest.fail("no run finished")
    assert run >= 3                                                  # the seed gives several kills
    for file in ("checkpoint_last.pt", "checkpoint_best.pt"):
        _assert_same_checkpoint(work / file, uninterrupted / file)


# ----------------------------------------------------------------------------------------------------------
# class 6: a full disk, a directory the user may not write to


class _FullDisk:
    """A file whose write fails with ENOSPC once `room` bytes are written, as a full file system's does."""

    def __init__(self, f, room: int):
        self.f, self.room = f, room

    def write(self, data) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def full_disk_at(name: str, nth: int, room: int = 1000) -> None:
    """Hook: the `nth` write of the file called `name` through utils.io.atomic finds the disk full."""
    from utils.io import atomic
    original = atomic.atomic_open
    count = [0]

    @contextlib.contextmanager
    def full_open(path, *args, **kwargs):
        count[0] += os.path.basename(path) == name
        with original(path, *args, **kwargs) as f:
            yield _FullDisk(f, room) if os.path.basename(path) == name and count[0] == nth else f
    atomic.atomic_open = full_open


@pytest.mark.parametrize("name,best_step", [("checkpoint_last.pt", 10), ("checkpoint_best.pt", 5)])
def test_a_full_disk_while_saving_is_one_line_and_keeps_the_previous_checkpoint(demo_corpus, tmp_path, name,
                                                                                 best_step):
    """ENOSPC at the step-10 save (a torch.save into checkpoint_best.pt, then a copy into checkpoint_last.pt):
    one line naming the file, exit 2, no temporary file left, the step-5 checkpoint_last.pt intact (and
    checkpoint_best.pt holds step 5, or step 10 when it was written before the disk filled)."""
    work = tmp_path / "work"
    argv = tiny_args(demo_corpus, work, max_step=20, eval_interval=5, no_test=True)
    result = cli_runner.train(argv, tmp_path, hook=full_disk_at, hook_args=(name, 2))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"error: cannot write {work / name}: no space left on the device; free space there (the previous file, if "
        "any, is kept) or write to another directory, and run again"]
    assert not list(work.glob(".*.tmp"))
    assert torch.load(work / "checkpoint_last.pt", weights_only=True)["train_step"] == 5
    assert torch.load(work / "checkpoint_best.pt", weights_only=True)["train_step"] == best_step


class _FullDiskAtLine:
    """A log file whose write fails with ENOSPC at the `nth` line that contains `marker` (and every write
    after it), as a file system that filled up while the run went on."""

    def __init__(self, f, marker: str, nth: int):
        self.f, self.marker, self.left, self.full = f, marker, nth, False

    def write(self, data):
        self.left -= self.marker in data
        self.full = self.full or self.left <= 0
        if self.full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.f.write(data)

    def flush(self):
        if self.full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.f.flush()

    def close(self):
        return self.f.close()

    def __getattr__(self, name):
        return getattr(self.f, name)


def log_full_at(log: str, marker: str, nth: int) -> None:
    """Hook: the text log ("text") or the JSON metrics ("json") finds the disk full at a chosen line."""
    from utils.training import metrics
    if log == "text":
        original = metrics._NoFollowFileHandler._open
        metrics._NoFollowFileHandler._open = lambda self: _FullDiskAtLine(original(self), marker, nth)
    else:
        original = metrics.open_nofollow
        metrics.open_nofollow = lambda *args, **kwargs: _FullDiskAtLine(original(*args, **kwargs), marker, nth)


@pytest.mark.parametrize("log,name,marker,nth", [("text", "train_log.log", "| Eval   2 at step", 1),
                                                 ("json", "train_log.json", '"valid_loss"', 2)])
def test_a_full_disk_while_a_log_is_written_is_one_line_and_keeps_the_checkpoint(demo_corpus, tmp_path, log,
                                                                                  name, marker, nth):
    """ENOSPC at the line of the second evaluation (step 10) in the text log or the JSON metrics: one line naming
    the file (not logging's traceback on stderr and a run that goes on without its log), exit 2, the step-5
    checkpoint intact, and what the log held before is kept."""
    work = tmp_path / "work"
    argv = tiny_args(demo_corpus, work, max_step=20, eval_interval=5, no_test=True)
    result = cli_runner.train(argv, tmp_path, hook=log_full_at, hook_args=(log, marker, nth))
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        f"error: cannot write {work / name}: no space left on the device; free space there (what it held before "
        "is kept) or write to another directory, and run again"]
    assert torch.load(work / "checkpoint_last.pt", weights_only=True)["train_step"] == 5
    text = (work / "train_log.log").read_text()
    assert "| Eval   1 at step        5" in text
    if log == "json":
        records = [json.loads(line) for line in (work / "train_log.json").read_text().splitlines()]
        assert sum("valid_loss" in r for r in records) == 1


def _skip_if_modes_do_not_bind(directory):
    probe = directory / "probe"
    directory.chmod(0o555)
    try:
        probe.write_text("")
    except PermissionError:
        return
    finally:
        directory.chmod(0o755)
    probe.unlink()
    pytest.skip("file modes do not bind for this user (root)")


def test_a_read_only_work_dir_at_a_save_is_one_line(demo_corpus, tmp_path):
    """The work directory turned read-only while the run goes on (a quota, an admin): the first save fails
    with one line naming the checkpoint and what to do."""
    work = tmp_path / "work"
    work.mkdir()
    _skip_if_modes_do_not_bind(work)
    argv = tiny_args(demo_corpus, work, max_step=20, eval_interval=5, no_test=True)
    result = cli_runner.train(argv, tmp_path, hook=read_only_before_save, hook_args=(str(work),))
    work.chmod(0o755)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        f"error: cannot write {work / 'checkpoint_best.pt'}: permission denied; make {work} writable for this "
        "user or write to another directory, and run again"]


def read_only_before_save(work: str) -> None:
    """Hook: the work directory becomes read-only just before the first checkpoint is saved."""
    from utils.training.checkpointer import Checkpointer
    original = Checkpointer.save

    def save(self, *args, **kwargs):
        os.chmod(work, 0o555)
        return original(self, *args, **kwargs)
    Checkpointer.save = save


def denied_at(name: str) -> None:
    """Hook: creating the temporary file of `name` is refused (EACCES), as in a directory the user may not
    write to; for root, whom file modes do not stop."""
    from utils.io import atomic
    original = atomic._create_temp

    def create(path):
        if path.name == name:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return original(path)
    atomic._create_temp = create


def test_permission_denied_at_a_save_is_one_line_for_root_too(demo_corpus, tmp_path):
    work = tmp_path / "work"
    argv = tiny_args(demo_corpus, work, max_step=20, eval_interval=5, no_test=True)
    result = cli_runner.train(argv, tmp_path, hook=denied_at, hook_args=("checkpoint_best.pt",))
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        f"error: cannot write {work / 'checkpoint_best.pt'}: permission denied; make {work} writable for this "
        "user or write to another directory, and run again"]
    assert not list(work.glob("*.pt")) and not list(work.glob(".*.tmp"))


# ----------------------------------------------------------------------------------------------------------
# class 7: a damaged dataset cache is found by its manifest and rebuilt


def _truncate(entry):
    data = (entry / "train.npy").read_bytes()
    (entry / "train.npy").write_bytes(data[: len(data) - 7])


def _id_out_of_range(entry):
    ids = np.load(entry / "train.npy", mmap_mode="r+")           # same size, one id past the vocabulary
    ids[len(ids) // 2] = np.iinfo(ids.dtype).max
    ids.flush()


def _vocab_damaged(entry):
    text = (entry / "vocab.json").read_text(encoding="utf-8")
    (entry / "vocab.json").write_text(text.replace('"', "'", 1), encoding="utf-8")


def _vocab_swapped(entry):
    """Two symbols exchanged: still valid JSON of the same size, a vocabulary that maps ids to other words."""
    vocab = json.loads((entry / "vocab.json").read_text(encoding="utf-8"))
    vocab["idx2sym"][0], vocab["idx2sym"][1] = vocab["idx2sym"][1], vocab["idx2sym"][0]
    (entry / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")


def _meta_damaged(entry):
    (entry / "meta.json").write_bytes((entry / "meta.json").read_bytes()[:-20])


def _file_missing(entry):
    (entry / "valid.npy").unlink()


DAMAGES = {"truncated ids": (_truncate, "train.npy has"), "id out of range": (_id_out_of_range, "train.npy holds id"),
           "vocab.json damaged": (_vocab_damaged, "vocab.json does not match its sha256"),
           "vocab swapped": (_vocab_swapped, "vocab.json does not match its sha256"),
           "meta.json damaged": (_meta_damaged, "meta.json: "), "file missing": (_file_missing, "valid.npy is missing")}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_cache_is_rebuilt_with_a_warning(demo_corpus, tmp_path, capsys, damage):
    import data_utils
    from data_utils import get_lm_corpus
    cache = tmp_path / "cache"
    built = get_lm_corpus(demo_corpus, "custom", cache_dir=cache, verbose=False)
    truth = {s: np.array(getattr(built, s)) for s in ("train", "valid", "test")}
    symbols = list(built.vocab.idx2sym)
    entry = built.cache_path
    del built
    damage_it, reason = DAMAGES[damage]
    damage_it(entry)

    corpus = get_lm_corpus(demo_corpus, "custom", cache_dir=cache)
    out, err = capsys.readouterr()
    assert len(err.splitlines()) == 1 and err.startswith(f"warning: dataset cache {entry} is damaged ({reason}")
    assert err.rstrip().endswith("; rebuilding it")
    assert "Producing dataset custom..." in out
    assert list(corpus.vocab.idx2sym) == symbols
    for split, ids in truth.items():
        assert np.array_equal(getattr(corpus, split), ids), split
    get_lm_corpus(demo_corpus, "custom", cache_dir=cache, verbose=False)   # the rebuilt cache loads quietly
    assert capsys.readouterr().err == ""
    assert sorted(p.name for p in (cache / os.listdir(cache)[0]).iterdir() if not p.name.startswith(".")) == [
        entry.name]
    assert data_utils.CACHE_FORMAT in (entry / "meta.json").read_text()


def test_train_on_a_damaged_cache_rebuilds_it_and_trains(demo_corpus, tmp_path):
    """train.py, whose first run wrote the cache: ids past the vocabulary would be an IndexError in the
    embedding mid-run; the second run rebuilds the cache with a warning line and trains."""
    from data_utils import get_lm_corpus
    cache = tmp_path / "cache"
    entry = get_lm_corpus(demo_corpus, "custom", cache_dir=cache, verbose=False).cache_path
    _id_out_of_range(entry)
    result = cli_runner.train(tiny_args(demo_corpus, tmp_path / "work", cache_dir=cache, max_step=4, eval_interval=4,
                                        no_test=True), tmp_path)
    assert result.returncode == 0, result.stderr
    assert [l for l in result.stderr.splitlines() if "damaged" in l] == [
        f"warning: dataset cache {entry} is damaged (train.npy holds id 255, the manifest says "
        f"{get_lm_corpus(demo_corpus, 'custom', cache_dir=cache, verbose=False).train.max()} and the vocabulary "
        f"has {len(get_lm_corpus(demo_corpus, 'custom', cache_dir=cache, verbose=False).vocab)}); rebuilding it"]


def test_a_full_disk_while_the_cache_is_built_is_one_line_and_leaves_no_partial_cache(demo_corpus, tmp_path,
                                                                                      monkeypatch):
    """ENOSPC in the scratch file of the vocabulary count (a plain open) and in a token file (atomic_open)."""
    import data_utils
    from utils.io.errors import UserError
    cache = tmp_path / "cache"
    real_open = open

    def full_open(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        return _FullDisk(f, 0) if str(path).endswith(".prov") else f
    monkeypatch.setattr(data_utils, "open", full_open, raising=False)
    with pytest.raises(UserError) as error:
        data_utils.get_lm_corpus(demo_corpus, "custom", cache_dir=cache, verbose=False)
    root = next(cache.iterdir())
    assert str(error.value) == (f"cannot write the dataset cache in {root}: no space left on device; free space "
                                "there or pass another --cache_dir")
    assert [p.name for p in root.iterdir() if not p.name.endswith(".lock")] == []
    monkeypatch.undo()

    from utils.io import atomic
    real_atomic_open = atomic.atomic_open

    @contextlib.contextmanager
    def full_atomic_open(path, *args, **kwargs):
        with real_atomic_open(path, *args, **kwargs) as f:
            yield _FullDisk(f, 100) if os.path.basename(path) == "valid.npy" else f
    monkeypatch.setattr(data_utils, "atomic_open", full_atomic_open)
    with pytest.raises(UserError, match=r"^cannot write .*valid\.npy: no space left on the device; free space"):
        data_utils.get_lm_corpus(demo_corpus, "custom", cache_dir=cache, verbose=False)
    assert [p.name for p in root.iterdir() if not p.name.endswith(".lock")] == []


@pytest.mark.parametrize("how", ["chmod", "injected"])
def test_an_unreadable_data_file_is_one_line(demo_corpus, tmp_path, monkeypatch, how):
    """A data file the user may not read: by its mode, and (for root, whom modes do not stop) by an open that
    raises EACCES for it."""
    import builtins
    import data_utils
    from utils.io.errors import UserError
    data = tmp_path / "data"
    shutil.copytree(demo_corpus, data)
    if how == "chmod":
        _skip_if_modes_do_not_bind(data)
        (data / "valid.txt").chmod(0)
    else:
        real_open = builtins.open

        def denied_open(path, *args, **kwargs):
            if str(path) == str(data / "valid.txt"):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
            return real_open(path, *args, **kwargs)
        monkeypatch.setattr(builtins, "open", denied_open)
    with pytest.raises(UserError) as error:
        data_utils.get_lm_corpus(data, "custom", cache_dir=tmp_path / "cache", verbose=False)
    assert str(error.value).startswith(f"cannot read {data / 'valid.txt'}: permission denied")


def test_a_run_continuing_another_directory_writes_its_own_best(demo_corpus, tmp_path):
    """--restart from another work directory's checkpoint (its best validation loss recorded, but no
    checkpoint_best.pt here): the next validation writes checkpoint_best.pt, even with a higher loss than the
    other run's best (a learning rate that makes the loss rise after the restart)."""
    first = tmp_path / "first"
    result = cli_runner.train(tiny_args(demo_corpus, first, max_step=10, eval_interval=5, no_test=True), tmp_path,
                              name="first")
    assert result.returncode == 0, result.stderr
    second = tmp_path / "second"
    result = cli_runner.train(tiny_args(demo_corpus, second, max_step=15, eval_interval=5, no_test=True, lr=5,
                                        restart=first / "checkpoint_last.pt"), tmp_path, name="second")
    assert result.returncode == 0, result.stderr
    old_best = torch.load(first / "checkpoint_best.pt", weights_only=True)["best_val_loss"]
    assert (f"No {second / 'checkpoint_best.pt'} for the checkpoint's best validation loss {old_best:.4f}: the "
            "next validation writes it") in result.lines
    best = torch.load(second / "checkpoint_best.pt", weights_only=True)
    assert best["train_step"] == 15 and best["best_val_loss"] > old_best   # written although worse


def test_a_kill_while_saving_keeps_every_save_all_checkpoint(demo_corpus, tmp_path):
    """--save_all: killed while checkpoint_10.pt is written, then resumed: every checkpoint_<step>.pt exists
    (before issue 13 checkpoint_last.pt, written first, already held step 10 and checkpoint_10.pt was never
    written)."""
    work = tmp_path / "work"
    argv = tiny_args(demo_corpus, work, max_step=20, eval_interval=5, no_test=True, save_all=True)
    killed = cli_runner.train(argv, tmp_path, name="killed", hook=kill_at_write,
                              hook_args=("checkpoint_10.pt", 1, "during"))
    assert killed.returncode == -signal.SIGKILL
    resumed = cli_runner.train(argv + ["--restart", str(work)], tmp_path, name="resumed")
    assert resumed.returncode == 0, resumed.stderr
    for step in (5, 10, 15, 20):
        assert torch.load(work / f"checkpoint_{step}.pt", weights_only=True)["train_step"] == step
