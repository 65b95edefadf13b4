#!/usr/bin/env python
"""torchrun for the recipes: the same flags and the same engine (torch.distributed's elastic launcher), but a
job whose process fails ends with one line naming that rank, its last message and its exit status.

    python scripts/launch.py --standalone --nproc_per_node=8 train.py [flags]      (scripts/run_recipe.sh)

torchrun itself prints its agent's log lines, a Python traceback and a "Root Cause" table when a process
fails; here they go to a log file, named in the line. The processes keep the console as under torchrun.
A process that stopped because another one failed (it sees a collective break, or it gets the launcher's
SIGTERM) is not the cause: the line names the process that failed first for a reason of its own.
The exit status is the failed rank's (2: bad input, 3: training diverged, 128 + N: killed by signal N).
"""
import logging
import os
import signal
import sys
import tempfile

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args, run as torchrun

PEER_FAILURE_EXIT = 4          # train.py's exit status when another process of the job failed first
LOGGERS = ("torch.distributed", "torch.distributed.elastic")


def log_to_file() -> str:
    """Send the launcher's own log lines (torch.distributed.elastic's) to a file instead of the console."""
    fd, path = tempfile.mkstemp(prefix="txl-launch-", suffix=".log")
    os.close(fd)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in LOGGERS:
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        logger.propagate = False
    return path


def root_cause(failures: dict) -> tuple[int, object]:
    """(rank, failure) of the process that failed for a reason of its own: not one that saw a peer fail (exit
    PEER_FAILURE_EXIT) or was stopped by the launcher (SIGTERM), unless all were; one that said why (its reply
    file) before one that did not; then the earliest."""
    def own(item) -> bool:
        return item[1].exitcode not in (PEER_FAILURE_EXIT, -signal.SIGTERM)
    candidates = [item for item in failures.items() if own(item)] or list(failures.items())
    return min(candidates, key=lambda item: (not message_of(item[1]), item[1].timestamp, item[0]))


def describe(failure) -> tuple[str, int]:
    """(how the process ended, the exit status for the shell)."""
    if failure.exitcode < 0:
        name = failure.signal_name()
        hint = " (as the kernel's out-of-memory killer does)" if name == "SIGKILL" else ""
        return f"killed by {name}{hint}", 128 - failure.exitcode
    return f"exit status {failure.exitcode}", failure.exitcode


def message_of(failure) -> str:
    """The process's own last error line (written by utils.io.errors.run_cli into torchelastic's reply file)."""
    text = failure.message if isinstance(failure.message, str) else failure.message.get("message", "")
    if not failure.error_file_data or text.startswith("To enable traceback") or text.startswith("Signal "):
        return ""
    text = " ".join(text.split())
    return text[len("error: "):] if text.startswith("error: ") else text


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    log_path = log_to_file()
    try:
        torchrun(args)                               # what torchrun runs, without its @record report
    except ChildFailedError as exc:
        logging.getLogger("torch.distributed.elastic").error("%s", exc.format_msg())
        rank, failure = root_cause(exc.failures)
        how, status = describe(failure)
        message = message_of(failure)
        print(f"error: rank {rank} failed, {how}" + (f": {message}" if message else "") +
              f" (launcher log: {log_path})", file=sys.stderr, flush=True)
        return status
    os.unlink(log_path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
