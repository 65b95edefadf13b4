"""One run per work directory: an exclusive lock on `<work_dir>/.lock` for the whole run.

The lock is an flock(2) on an open file, so the kernel drops it when the process ends, however it ends
(SIGKILL, a node's OOM killer): a killed run never leaves a stale lock behind, and the lock file itself is left
in place on purpose (removing it would let a third run lock a fresh inode while a second still holds the old
one). The file holds the holder's host and pid, for the message the next run prints.

flock on a network file system: Linux NFS (v4, and v3 with the lock manager) and Lustre with `flock` mounted
implement it across nodes; where a file system does not, flock fails with ENOLCK/EOPNOTSUPP and the run
says so instead of running unprotected.
"""
import errno
import fcntl
import os
import socket
from pathlib import Path

from utils.io.errors import UserError

LOCK_NAME = ".lock"


class WorkDirLock:
    """Hold the exclusive lock on a work directory until release() or the end of the process."""

    def __init__(self, work_dir: str | os.PathLike):
        self.path = Path(work_dir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> "WorkDirLock":
        """Take the lock, or raise the one-line UserError naming the run that holds it."""
        try:
            # O_NOFOLLOW: a symbolic link planted as .lock must not make us write its target
            # 0o666: the umask decides, as for every file of the run
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
        except OSError as exc:
            raise UserError(f"cannot create the lock file {self.path}: {exc.strerror or exc}; check that the "
                            "work dir is writable (--work_dir)") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read(fd)
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EACCES):
                raise UserError(_in_use(self.path, holder)) from None
            raise UserError(f"cannot lock the work dir {self.path.parent} ({exc.strerror or exc}: its file system "
                            "does not support flock); choose a --work_dir on a local or flock-capable "
                            "file system") from None
        line = f"host {socket.gethostname()}, pid {os.getpid()}\n".encode()
        try:
            os.pwrite(fd, line, 0)
            os.ftruncate(fd, len(line))             # the end of a longer line of an earlier holder
        except OSError as exc:
            os.close(fd)
            raise UserError(f"cannot write the lock file {self.path}: {(exc.strerror or str(exc)).lower()}; free "
                            "space there or choose another --work_dir") from None
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)                      # closing the last descriptor drops the flock
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> "WorkDirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def check_unlocked(work_dir: str | os.PathLike) -> None:
    """The one-line UserError when a run holds the lock of `work_dir` now; writes nothing (train.py --check)."""
    path = Path(work_dir) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)   # flock needs no write access
    except OSError:
        return                                      # no lock file: no run ever locked it; a link: the run says so
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EACCES):
            raise UserError(_in_use(path, _read(fd))) from None
    finally:
        os.close(fd)


def _in_use(path: Path, holder: str) -> str:
    return (f"work dir {path.parent} is in use by another run ({holder or 'holder unknown'}); wait for it to end, "
            "stop it, or choose another --work_dir")


def _read(fd: int) -> str:
    """The holder's line ("host H, pid P"): empty while it has not written it yet."""
    try:
        return os.pread(fd, 200, 0).decode("utf-8", "replace").strip().splitlines()[0]
    except (OSError, IndexError):
        return ""
