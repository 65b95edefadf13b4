"""Errors caused by bad user input, and the one way the command-line tools report them.

Anything the user can fix (a missing folder, a bad flag, a corrupt checkpoint) raises `UserError` with a
message that says what is wrong and what to do. `run_cli` turns it into one line on stderr and a non-zero
exit, without a traceback. Programming errors keep their tracebacks.
"""
import sys
from typing import Callable


class UserError(Exception):
    """Bad input: the message is shown to the user as is, on one line."""

    exit_code = 2


def run_cli(main: Callable[[], int | None]) -> None:
    """Run a CLI entry point: UserError -> `error: <message>` on stderr and exit code 2."""
    try:
        code = main()
    except UserError as exc:
        message = " ".join(str(exc).split())  # always one line
        print(f"error: {message}", file=sys.stderr, flush=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr, flush=True)
        sys.exit(130)
    sys.exit(code or 0)
