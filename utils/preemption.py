"""Graceful stop on SIGTERM (and the signal Slurm sends before a time limit, e.g. SIGUSR1).

Inside `with PreemptionHandler() as stop:` the first such signal only sets `stop.requested`; the training
loop checks it after each optimizer step (OR-reduced over all ranks, so a signal seen by one rank stops all),
writes a checkpoint and exits with PREEMPTED_EXIT_CODE. A second signal while saving is ignored, so the
checkpoint is never cut short by a repeated signal.

PREEMPTED_EXIT_CODE is 75 (EX_TEMPFAIL of sysexits.h: "try again later"): the run stopped early on purpose and
a checkpoint holds its state, so a scheduler can tell it apart from success (0) and from failure (1-4) and
start it again with --restart (run.sub requeues the Slurm job on it).
"""
import logging
import signal
from types import FrameType
from typing import Optional

LOG = logging.getLogger("txl")

DEFAULT_SIGNALS = ("SIGTERM", "SIGUSR1")
PREEMPTED_EXIT_CODE = 75


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
