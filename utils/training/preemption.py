"""Graceful stop on SIGTERM (and the signal Slurm sends before a time limit, e.g. SIGUSR1).

Inside `with PreemptionHandler() as stop:` the first such signal only sets `stop.requested`; the training
loop checks it after each optimizer step (OR-reduced over all ranks, so a signal seen by one rank stops all),
writes a checkpoint, and every rank exits with code 0 (as the reference did). A second signal while saving is
ignored, so the checkpoint is never cut short by a repeated signal.

So that a job script can tell "stopped early, resume me" from "finished", rank 0 also writes the file
`preempted` (one line: signal, step, how to resume) into the work dir after the checkpoint; the next run in
that work dir removes it when it starts. run.sub requeues the Slurm job when it finds the file.
"""
import logging
import signal
from pathlib import Path
from types import FrameType
from typing import Optional

from utils.io.atomic import write_text_atomic

LOG = logging.getLogger("txl")

DEFAULT_SIGNALS = ("SIGTERM", "SIGUSR1")
MARKER_NAME = "preempted"


class PreemptionHandler:
    def __init__(self, signals: tuple[str, ...] = DEFAULT_SIGNALS):
        self.signals = [getattr(signal, name) for name in signals if hasattr(signal, name)]
        self.requested = False
        self.signal_name: Optional[str] = None
        self._previous: dict = {}

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        name = signal.Signals(signum).name
        if self.requested:
            LOG.info(f"Received {name}, already stopping")
            return
        self.requested = True
        self.signal_name = name
        LOG.info(f"Received {name}: saving a checkpoint after this step and exiting")

    def __enter__(self) -> "PreemptionHandler":
        for sig in self.signals:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals cannot be handled here
                pass
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()


def write_marker(work_dir: Path, signal_name: str, step: int) -> None:
    """Leave `work_dir/preempted` (atomically) saying that the run stopped early with a checkpoint."""
    path = Path(work_dir) / MARKER_NAME
    write_text_atomic(path, f"stopped by {signal_name} after step {step} with a checkpoint; resume with "
                            f"--restart {work_dir} (or --restart auto)\n")


def clear_marker(work_dir: Path) -> None:
    (Path(work_dir) / MARKER_NAME).unlink(missing_ok=True)
