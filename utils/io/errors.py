"""Errors caused by bad user input, and the one way the command-line tools report them.

Anything the user can fix (a missing folder, a bad flag, a corrupt checkpoint) raises `UserError` with a
message that says what is wrong and what to do. `run_cli` turns it into one line on stderr and a non-zero
exit, without a traceback. Programming errors keep their tracebacks.

Under torchrun (or scripts/launch.py, which the recipes use) every process's last error line also goes to
the launcher's reply file ($TORCHELASTIC_ERROR_FILE), so the launcher can name the process that failed and
why in one line. There, only rank 0 prints a UserError (the ranks fail alike, or the launcher reports the one
that failed alone), and a process that stopped because another one failed (`caused_by_peer`) prints nothing.
"""
import json
import logging
import os
import sys
import time
import traceback
from typing import Callable


class UserError(Exception):
    """Bad input: the message is shown to the user as is, on one line."""

    exit_code = 2
    caused_by_peer = False      # True: this process stopped because another process of the job failed


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def report_to_launcher(message: str) -> bool:
    """Write `message` to torchelastic's reply file of this process; False when no launcher asked for one."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return False
    try:
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"message": message, "timestamp": int(time.time())}, f)
    except OSError:
        return False
    return True


def run_cli(main: Callable[[], int | None]) -> None:
    """Run a CLI entry point: UserError -> `error: <message>` on stderr and its exit code (2 by default)."""
    try:
        code = main()
    except UserError as exc:
        message = f"error: {_one_line(exc)}"
        launched = "TORCHELASTIC_ERROR_FILE" in os.environ
        if not (launched and exc.caused_by_peer):
            report_to_launcher(message)
            if not launched or os.environ.get("RANK", "0") == "0":
                print(message, file=sys.stderr, flush=True)
        _exit(exc.exit_code)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr, flush=True)
        _exit(130)
    except Exception as exc:                      # a bug: the traceback follows; the launcher gets its last line
        report_to_launcher(_one_line(f"{type(exc).__name__}: {exc}"))
        if _one_of_several():
            traceback.print_exc()
            _exit(1)
        raise
    sys.exit(code or 0)


def _one_of_several() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def _exit(code: int) -> None:
    """Exit with `code`. A process of several that fails leaves without the interpreter's teardown: its process
    group is still alive, and tearing the interpreter down with it aborts in torch's communication threads
    (SIGABRT instead of the exit status that says what happened)."""
    if not _one_of_several():
        sys.exit(code)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
