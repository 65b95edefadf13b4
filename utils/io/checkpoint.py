"""Checkpoint files: atomic writes (utils.io.atomic), and safe loads of ours and of the reference trainer's.

Our checkpoints hold tensors and plain Python types only, so `torch.load(..., weights_only=True)` reads them.
The reference trainer (NVIDIA DeepLearningExamples) pickled three Python objects into its checkpoints:
`args` (argparse.Namespace), `vocab` (its utils.data.vocabulary.Vocab) and, inside the vocab, a
collections.Counter. We read those with inert stand-in classes registered for the weights-only unpickler,
so no code from the file runs, and turn them into plain dicts.
"""
import collections
import os
import re
from pathlib import Path
from typing import Any

import torch

from utils.io.atomic import copy_file_atomic, remove_temp_files, torch_save_atomic
from utils.io.errors import UserError


class _ReferenceNamespace:
    """Stand-in for argparse.Namespace in reference checkpoints: only holds attributes."""


class _ReferenceVocab:
    """Stand-in for the reference's utils.data.vocabulary.Vocab: only holds attributes."""


_REFERENCE_SAFE_GLOBALS = [
    (_ReferenceNamespace, "argparse.Namespace"),
    (_ReferenceVocab, "utils.vocabulary.Vocab"),
    collections.Counter,
]


def _plain(value: Any) -> Any:
    """Turn unpickled stand-ins into plain Python types (dicts, lists, numbers, strings, tensors)."""
    if isinstance(value, (_ReferenceNamespace, _ReferenceVocab)):
        return {k: _plain(v) for k, v in vars(value).items()}
    if isinstance(value, collections.Counter):
        return dict(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    return value


# the format train.py writes, and every format this version reads ("reference": the reference trainer's files)
CHECKPOINT_FORMAT = "txl-train-v2"
READABLE_FORMATS = ("txl-train-v1", CHECKPOINT_FORMAT, "reference")


def check_format(ckpt: dict, path) -> None:
    """Refuse a checkpoint of a format this version does not know (written by a newer version)."""
    if ckpt.get("format") not in READABLE_FORMATS:
        raise UserError(f"checkpoint {path} was written by a newer version (format {ckpt.get('format')}); this "
                        f"version reads {', '.join(READABLE_FORMATS[:-1])}: update the code, or use a checkpoint "
                        "written by this version")


def checkpoint_file(path: str | os.PathLike) -> Path:
    """The checkpoint file `path` names (a directory: its checkpoint_last.pt), or the one-line error."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint_last.pt"
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; pass the path of a .pt file written by train.py")
    return path


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """Load one of our checkpoints or a reference checkpoint without running pickled code.

    A directory means `<dir>/checkpoint_last.pt`. Reference checkpoints come back with `args` and `vocab` as
    plain dicts and `format` set to "reference"; ours keep the `format` they were written with.
    Raises UserError when the file is missing, truncated, corrupt, not a checkpoint or of a newer format.
    """
    path = checkpoint_file(path)
    try:
        with torch.serialization.safe_globals(_REFERENCE_SAFE_GLOBALS):
            state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many kinds for truncated / corrupt / unsafe files
        text = str(exc).strip()
        unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        if unsafe:
            raise UserError(f"checkpoint {path} holds a pickled Python object ({unsafe[1]}) that is not loaded, "
                            "since loading it could run code from the file: use a checkpoint written by train.py "
                            "or by the reference trainer") from None
        reason = text.splitlines()[0].split(". ")[0] if text else type(exc).__name__  # torch adds long advice
        raise UserError(
            f"checkpoint {path} cannot be read ({reason[:200]}); it is truncated, corrupt or not a "
            "checkpoint: use another one (checkpoint_best.pt / checkpoint_last.pt)"
        ) from None
    if not isinstance(state, dict) or "model_state" not in state or "model_config" not in state:
        raise UserError(f"{path} is not a Transformer-XL checkpoint (no model_state / model_config)")
    state = _plain(state)
    state.setdefault("format", "reference")
    check_format(state, path)
    return state


def save_checkpoint_atomic(state: dict, path: str | os.PathLike) -> None:
    """Write `state` to `path` so that `path` is always either the old file or the complete new one
    (utils.io.atomic): a process killed at any moment leaves the previous checkpoint intact."""
    torch_save_atomic(state, path)


def copy_checkpoint_atomic(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy a finished checkpoint file to `dst` with the same all-or-nothing guarantee."""
    copy_file_atomic(src, dst)


def remove_partial_writes(directory: str | os.PathLike) -> list[Path]:
    """Delete the temporary files of checkpoint writes that never finished (their process was killed before
    the rename); returns them. The checkpoints themselves are never half-written, only these files are."""
    return remove_temp_files(directory, "*.pt")
