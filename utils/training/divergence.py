"""Stopping a run whose loss or gradient norm is no longer finite."""
import math
from pathlib import Path

from utils.io.errors import UserError


class TrainingDiverged(UserError):
    exit_code = 3


class DivergenceGuard:
    """Raises TrainingDiverged for a value that is not finite. No checkpoint is written then: the last one
    written holds the last good weights, and the message says where it is."""

    def __init__(self, work_dir: Path):
        self.work_dir = Path(work_dir)

    def check(self, step: int, what: str, value: float) -> None:
        if math.isfinite(value):
            return
        last = self.work_dir / "checkpoint_last.pt"
        kept = f"the last good checkpoint is {last}" if last.is_file() else "no checkpoint was written yet"
        raise TrainingDiverged(f"the {what} became {value} at step {step}; stopped without saving, {kept}; "
                               "lower --lr, raise --warmup_step or use --bf16 instead of --fp16")
