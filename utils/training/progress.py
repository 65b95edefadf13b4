"""Progress where a user waits: tqdm bars on stderr, and the elapsed time and ETA of the training log line.

Bars are drawn only when stderr is a terminal (logs and pipes stay clean), unless `--progress` forces them on
or `--no_progress` off. The ETA takes a fraction done, so any measure of progress (steps to --max_step,
tokens to a token budget, whichever is further along) can feed it:

    fraction = trainer.fraction_done()
    eta = eta_seconds(elapsed_this_session, fraction, fraction_at_session_start)
"""
import sys
from typing import Optional


def show_progress(args) -> bool:
    """--progress / --no_progress, else: bars only when stderr is a terminal."""
    forced = getattr(args, "progress", None)
    if forced is not None:
        return bool(forced)
    return sys.stderr.isatty()


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def progress_bar(total: Optional[int], desc: str, enabled: bool, unit: str = "batch"):
    """A tqdm bar on stderr (with rate and ETA) that disappears when done, or an object that does nothing."""
    if not enabled:
        return _NoBar()
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit=unit, leave=False, file=sys.stderr, dynamic_ncols=True)


def eta_seconds(elapsed: float, fraction: float, fraction_at_start: float = 0.0) -> Optional[float]:
    """Seconds left at the pace so far: `elapsed` seconds took the work from `fraction_at_start` to `fraction`
    (both in [0, 1]); None before any progress."""
    done = fraction - fraction_at_start
    if done <= 0 or elapsed < 0:
        return None
    return max(0.0, elapsed * (1.0 - fraction) / done)


def format_duration(seconds: Optional[float]) -> str:
    """H:MM:SS ('-' when unknown)."""
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def progress_fields(elapsed: float, eta: Optional[float]) -> str:
    """What the training log line gets after the reference's fields."""
    return f" | elapsed {format_duration(elapsed)} | eta {format_duration(eta)}"
