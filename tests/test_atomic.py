"""utils.io.atomic: the one writer of checkpoints, caches, vocabularies, configurations and results."""
import os
import stat
import threading

import pytest
import torch

from utils.io import atomic
from utils.io.atomic import (atomic_open, copy_file_atomic, remove_temp_files, torch_save_atomic, write_bytes_atomic,
                             write_text_atomic)
from utils.io.checkpoint import remove_partial_writes, save_checkpoint_atomic


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_text_and_binary_content_is_written(tmp_path):
    write_text_atomic(tmp_path / "a.json", '{"ppl": 24.1, "name": "wikitext-103 \u00e9"}\n')
    assert (tmp_path / "a.json").read_bytes() == '{"ppl": 24.1, "name": "wikitext-103 \u00e9"}\n'.encode("utf-8")
    write_bytes_atomic(tmp_path / "b.bin", bytes(range(256)))
    assert (tmp_path / "b.bin").read_bytes() == bytes(range(256))
    with atomic_open(tmp_path / "c.csv", "w", newline="") as f:
        f.write("a,b\r\n1,2\n")
    assert (tmp_path / "c.csv").read_bytes() == b"a,b\r\n1,2\n"            # newline="" writes as given
    with atomic_open(tmp_path / "sub" / "d.txt", "w", encoding="latin-1") as f:   # parent folder created
        f.write("caf\u00e9")
    assert (tmp_path / "sub" / "d.txt").read_bytes() == b"caf\xe9"
    assert leftovers(tmp_path) == []


def test_an_existing_file_is_replaced_whole(tmp_path):
    target = tmp_path / "vocab.txt"
    target.write_text("x" * 10000)
    write_text_atomic(target, "short\n")
    assert target.read_text() == "short\n"                                 # no tail of the longer old file
    inode = target.stat().st_ino
    write_bytes_atomic(target, b"new")
    assert target.read_bytes() == b"new"
    assert target.stat().st_ino != inode                                   # a new file renamed in, not rewritten


def test_new_files_get_the_usual_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        write_text_atomic(tmp_path / "results.json", "{}")
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "results.json").stat().st_mode) == 0o644


def test_the_target_is_untouched_when_the_block_raises(tmp_path):
    target = tmp_path / "meta.json"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="disk on fire"):
        with atomic_open(target, "w") as f:
            f.write("half of the new conte")
            f.flush()
            assert len(leftovers(tmp_path)) == 1                          # the data went to a hidden temporary file
            raise RuntimeError("disk on fire")
    assert target.read_text() == "old"
    assert leftovers(tmp_path) == []
    with pytest.raises(KeyboardInterrupt):                                 # also for a Ctrl-C
        with atomic_open(tmp_path / "new.bin") as f:
            f.write(b"abc")
            raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta.json"]    # a new target is not created either


def test_a_failed_torch_save_leaves_the_previous_checkpoint(tmp_path):
    path = tmp_path / "checkpoint_last.pt"
    torch_save_atomic({"model_state": {"w": torch.arange(4.0)}, "step": 1}, path)
    assert torch.load(path, weights_only=True)["step"] == 1
    with pytest.raises(Exception):
        torch_save_atomic({"model_state": {"w": torch.zeros(1000)}, "bad": threading.Lock()}, path)  # unpicklable
    state = torch.load(path, weights_only=True)
    assert state["step"] == 1 and torch.equal(state["model_state"]["w"], torch.arange(4.0))
    assert leftovers(tmp_path) == []
    save_checkpoint_atomic({"step": 2}, path)                              # the checkpoint API on top of it
    assert torch.load(path, weights_only=True) == {"step": 2}


def test_copy_file_atomic(tmp_path):
    src = tmp_path / "checkpoint_last.pt"
    src.write_bytes(os.urandom(3000))
    copy_file_atomic(src, tmp_path / "checkpoint_best.pt")
    assert (tmp_path / "checkpoint_best.pt").read_bytes() == src.read_bytes()
    with pytest.raises(FileNotFoundError):
        copy_file_atomic(tmp_path / "missing.pt", tmp_path / "checkpoint_best.pt")
    assert (tmp_path / "checkpoint_best.pt").read_bytes() == src.read_bytes()
    assert leftovers(tmp_path) == []


def test_file_and_directory_are_fsynced_before_and_after_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync-dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync-file", fd))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.fspath(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "fsync", fsync)
    monkeypatch.setattr(atomic.os, "replace", replace)
    write_text_atomic(tmp_path / "x.json", "{}")
    assert [e[0] for e in events] == ["fsync-file", "replace", "fsync-dir"]
    assert events[1][1] == str(tmp_path / "x.json")


def test_a_directory_fsync_refused_by_the_platform_is_ignored(tmp_path, monkeypatch):
    real_fsync = os.fsync

    def fsync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(22, "Invalid argument")
        real_fsync(fd)

    monkeypatch.setattr(atomic.os, "fsync", fsync)
    write_text_atomic(tmp_path / "x.json", "{}")
    assert (tmp_path / "x.json").read_text() == "{}"


def test_only_whole_file_modes(tmp_path):
    for mode in ("a", "r+", "ab", "x"):
        with pytest.raises(ValueError, match="mode"):
            with atomic_open(tmp_path / "x", mode):
                pass
    with pytest.raises(LookupError):
        write_text_atomic(tmp_path / "x", "text", encoding="no-such-codec")
    assert list(tmp_path.iterdir()) == []


def test_temporary_files_of_killed_writes_are_found_and_removed(tmp_path):
    (tmp_path / "checkpoint_last.pt").write_bytes(b"done")
    (tmp_path / "valid.txt").write_text("done")
    cm = atomic_open(tmp_path / "checkpoint_last.pt")            # a write interrupted before its rename ...
    cm.__enter__().write(b"partial")
    cm2 = atomic_open(tmp_path / "valid.txt", "w")
    cm2.__enter__().write("partial")
    # ... (its process killed: no __exit__ runs); both temporaries are on disk, named after their targets
    assert len(leftovers(tmp_path)) == 2
    removed = remove_partial_writes(tmp_path)                    # checkpoints only
    assert len(removed) == 1 and removed[0].name.startswith(".checkpoint_last.pt.")
    left = leftovers(tmp_path)
    assert len(left) == 1 and left[0].startswith(".valid.txt.")
    assert [p.name for p in remove_temp_files(tmp_path)] == left
    assert leftovers(tmp_path) == []
    assert (tmp_path / "checkpoint_last.pt").read_bytes() == b"done" and (tmp_path / "valid.txt").read_text() == "done"
    del cm, cm2                                                  # their clean-up finds nothing left to remove
