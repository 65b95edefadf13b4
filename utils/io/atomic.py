"""All-or-nothing file writes: a reader (or a process started after a crash) sees either the old file or the
complete new one, never a half-written file.

The data goes to a hidden temporary file in the target's directory (`.<name>.<random>.tmp`), which is flushed
and fsynced, renamed onto the target with os.replace (atomic on POSIX and Windows), and the directory is then
fsynced so that the rename itself survives a power loss. If anything fails before the rename, the temporary
file is removed and the target is left as it was. A process killed outright can leave a temporary file
behind; `remove_temp_files` deletes those.

No write here goes through a symbolic link planted in the work directory (a `train_log.log` that points at
someone's ~/.bashrc): the temporary file is created with O_EXCL, which refuses an existing link, and
os.replace renames onto the link itself, never its target. Files that grow (logs) are opened with
`open_nofollow`, which refuses a link with one line.
"""
import contextlib
import errno
import os
import secrets
import shutil
from pathlib import Path
from typing import IO, Any, Iterator

from utils.io.errors import UserError

TEMP_SUFFIX = ".tmp"


def fsync_dir(directory: str | os.PathLike) -> None:
    """Flush a directory entry (a rename or a new file in it) to disk; a no-op where the platform refuses."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # Windows cannot open a directory
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a directory
        pass
    finally:
        os.close(fd)


def _create_temp(path: Path) -> tuple[int, Path]:
    # os.open with mode 0o666 honours the umask, so the final file gets the usual permissions (mkstemp's 0o600
    # would make results and data files private to their writer).
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}{TEMP_SUFFIX}")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", encoding: str | None = None,
                newline: str | None = None, sync_dir: bool = True) -> Iterator[IO[Any]]:
    """Open `path` for writing through a temporary file that replaces it when the block ends without error.

    `mode` is "wb" (binary) or "w" (text, UTF-8 unless `encoding` says otherwise; `newline` as for open).
    The parent directory is created. On an exception in the block the target is untouched and the temporary
    file is removed. `sync_dir=False` leaves the directory's fsync to the caller (a folder of files written
    together and then renamed into place needs one fsync of the folder, not one per file)."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes whole files: mode must be 'w' or 'wb', not {mode!r}")
    if mode == "wb" and (encoding is not None or newline is not None):
        raise ValueError("encoding and newline apply to text mode ('w') only")
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = _create_temp(path)
    except OSError as exc:
        _raise_user_fault(exc, path)
        raise
    try:
        text = {"encoding": encoding or "utf-8", "newline": newline} if mode == "w" else {}
        with os.fdopen(fd, mode, **text) as f:  # closes fd itself if it fails (e.g. an unknown encoding)
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        _raise_user_fault(exc, path)
        raise
    if sync_dir:
        fsync_dir(path.parent)


# A full disk or a directory the user may not write to is the user's to fix, not a bug: one line naming the
# file (utils.io.errors.UserError) instead of a traceback. The target is untouched either way (see above).
_FULL = {errno.ENOSPC: "no space left on the device", getattr(errno, "EDQUOT", -1): "disk quota exceeded"}
_DENIED = {errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
           errno.EROFS: "read-only file system"}


def _raise_user_fault(exc: BaseException, path: Path, appending: bool = False) -> None:
    if not isinstance(exc, OSError) or exc.errno not in {**_FULL, **_DENIED}:
        return
    from utils.io.errors import UserError
    kept = "what it held before is kept" if appending else "the previous file, if any, is kept"
    if exc.errno in _FULL:
        raise UserError(f"cannot write {path}: {_FULL[exc.errno]}; free space there ({kept}) or write to another "
                        "directory, and run again") from None
    raise UserError(f"cannot write {path}: {_DENIED[exc.errno]}; make {path.parent} writable for this user or "
                    "write to another directory, and run again") from None


def raise_append_fault(exc: BaseException, path: str | os.PathLike) -> None:
    """For a file written in place by appending (a log): a full disk or a refused write as one UserError line
    naming the file; any other error is left to the caller."""
    _raise_user_fault(exc, Path(path), appending=True)


def make_dir(path: str | os.PathLike, what: str, flag: str) -> None:
    """mkdir -p `path` (`what` names it, `flag` is the option that chooses it), or one UserError line."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        from utils.io.errors import UserError
        if exc.errno in _FULL:
            reason = _FULL[exc.errno]
        elif exc.errno in _DENIED:
            reason = _DENIED[exc.errno]
        elif exc.errno in (errno.EEXIST, errno.ENOTDIR):
            reason = "a file is in the way (a folder is needed there)"
        else:
            reason = (exc.strerror or str(exc)).lower()
        raise UserError(f"cannot create the {what} {path}: {reason}; choose another {flag}") from None


def umask() -> int:
    """The process's umask (read by setting it back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_text_atomic(path: str | os.PathLike, text: str, encoding: str = "utf-8", newline: str | None = None,
                      sync_dir: bool = True) -> None:
    """Replace `path` with `text` (UTF-8 by default), atomically (`sync_dir`: see atomic_open)."""
    with atomic_open(path, "w", encoding=encoding, newline=newline, sync_dir=sync_dir) as f:
        f.write(text)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Replace `path` with `data`, atomically."""
    with atomic_open(path, "wb") as f:
        f.write(data)


def torch_save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """torch.save(obj) into `path`, atomically: a failed save (e.g. an object that cannot be pickled) leaves
    the previous file as it was."""
    import torch  # here, so that scripts which only write text do not import torch

    with atomic_open(path, "wb") as f:
        recorder = _WriteErrors(f)
        try:
            torch.save(obj, recorder)
        except RuntimeError:
            # torch's zip writer turns the OSError of a write (a full disk) into "RuntimeError: unexpected
            # pos": raise the OSError itself, which atomic_open reports as one line
            if recorder.error is not None:
                raise recorder.error from None
            raise


class _WriteErrors:
    """A binary file that remembers the OSError its write raised."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def __getattr__(self, name):
        return getattr(self.f, name)


def copy_file_atomic(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy the file `src` to `dst`, atomically (`dst` is the old file or a complete copy)."""
    with open(src, "rb") as inp, atomic_open(dst, "wb") as out:
        shutil.copyfileobj(inp, out, 1 << 24)


def remove_temp_files(directory: str | os.PathLike, pattern: str = "*") -> list[Path]:
    """Delete the temporary files of writes into `directory` that never finished (their process was killed
    before the rename), for targets whose names match the glob `pattern`; returns the files removed."""
    removed = []
    for tmp in sorted(Path(directory).glob(f".{pattern}.*{TEMP_SUFFIX}")):
        try:
            tmp.unlink()
        except FileNotFoundError:
            continue
        removed.append(tmp)
    return removed


def open_nofollow(path: str | os.PathLike, mode: str = "a", encoding: str = "utf-8", buffering: int = -1) -> IO[str]:
    """Open the text file `path` to append to ("a") or to rewrite ("w"), refusing a symbolic link (UserError)
    instead of writing into whatever it points at. Created with mode 0o666 less the umask, as open() does."""
    if mode not in ("a", "w"):
        raise ValueError(f"open_nofollow writes text files: mode must be 'a' or 'w', not {mode!r}")
    flags = (os.O_WRONLY | os.O_CREAT | (os.O_APPEND if mode == "a" else os.O_TRUNC)
             | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0))
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as exc:
        # ELOOP is what Linux and macOS return for O_NOFOLLOW on a link (FreeBSD: EMLINK); where O_NOFOLLOW is
        # missing (Windows) the check below is the only one
        if exc.errno in (errno.ELOOP, errno.EMLINK) and os.path.islink(path):
            raise _symlink_error(path) from None
        _raise_user_fault(exc, Path(path), appending=True)
        from utils.io.errors import UserError
        raise UserError(f"cannot write {path}: {(exc.strerror or str(exc)).lower()}; remove what is in the way or "
                        "write to another directory, and run again") from None
    if not getattr(os, "O_NOFOLLOW", 0) and os.path.islink(path):
        os.close(fd)
        raise _symlink_error(path)
    return os.fdopen(fd, mode, encoding=encoding, buffering=buffering)


def _symlink_error(path: str | os.PathLike) -> UserError:
    return UserError(f"{path} is a symbolic link (to {os.readlink(path)}); a run does not write through links, "
                     "which could overwrite their target: remove the link or choose another work directory")
