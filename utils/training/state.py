"""TrainState: the progress of a training run, the one place the loop keeps it and the checkpoint stores it.

The counters (step, tokens, epoch, best validation loss, time, the open log interval) are updated by the loop
as it goes. The snapshot fields (data position, per-rank random states and memory, scheduler and loss-scaler
state) are filled when a checkpoint is taken and read back when a run resumes; between those moments the
live objects (iterator, generators, memory tensors, scheduler, scaler) hold them.

`state_dict()` holds plain Python types and tensors only, so a checkpoint loads with
`torch.load(..., weights_only=True)`. Its keys are those of the first checkpoint format (txl-train-v1), which
tools and job scripts read (e.g. `ckpt["train_step"]`), plus `tokens_seen` (and `noise_acc` with
--log_noise_scale).
"""
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional

from utils.io.errors import UserError


@dataclass
class LogInterval:
    """The steps since the last training log line, which that line averages over (on this rank)."""
    loss: float = 0.0       # sum of the step losses
    steps: int = 0
    tokens: int = 0         # target tokens
    elapsed: float = 0.0    # training seconds already counted: before a pause (evaluation, checkpoint, restart)

    def add(self, loss: float, tokens: int) -> None:
        self.loss += loss
        self.steps += 1
        self.tokens += tokens

    def state_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainState:
    train_step: int = 0                    # optimizer steps done
    tokens_seen: int = 0                   # target tokens trained on, all ranks together
    epoch: int = 1
    batch: int = 0                         # batches of this epoch done (the iterator's position)
    last_iter: int = 0
    best_val_loss: Optional[float] = None
    train_elapsed: float = 0.0             # seconds, over every run that led to this state
    log_acc: LogInterval = field(default_factory=LogInterval)
    # the layout the snapshot was taken with: per-rank parts only fit a run with the same layout
    world_size: int = 1
    batch_chunk: int = 1
    # snapshot, one entry per rank: data iterator state, random generator states, memory per batch chunk
    data_states: Optional[list] = None
    rng_states: Optional[list] = None
    memory: Optional[list] = None
    scheduler_state: Optional[dict] = None
    scaler_state: Optional[dict] = None    # None without a loss scaler (no --fp16)
    noise_acc: Optional[dict] = None       # --log_noise_scale: the open log interval's sums (NoiseScaleMeter)

    def record_validation(self, val_loss: Optional[float]) -> bool:
        """Keep the best validation loss; True when `val_loss` is a new best."""
        is_best = val_loss is not None and (self.best_val_loss is None or val_loss < self.best_val_loss)
        if is_best:
            self.best_val_loss = val_loss
        return is_best

    def same_layout(self, world_size: int, batch_chunk: int) -> bool:
        """Whether the per-rank snapshot (memory, random states) fits a run of this layout."""
        return self.world_size == world_size and self.batch_chunk == batch_chunk

    def state_dict(self) -> dict:
        state = {f.name: getattr(self, f.name) for f in fields(self)}
        state["log_acc"] = self.log_acc.state_dict()
        if self.noise_acc is None:                          # only runs with --log_noise_scale carry it
            del state["noise_acc"]
        return state

    def load_state_dict(self, state: dict) -> None:
        """Read a state_dict, or the whole checkpoint that holds one (other keys are ignored).

        Checkpoints of format txl-train-v1 have no `tokens_seen`: it keeps its current value. A missing field
        or one of the wrong type or value (a step that is text, a negative position, fewer per-rank entries
        than processes) raises UserError naming it, before anything is changed."""
        optional = {"tokens_seen", "noise_acc"}
        missing = [f.name for f in fields(self) if f.name not in state and f.name not in optional]
        if missing:
            raise UserError(f"the training state lacks {', '.join(missing)}")
        check_state_values(state)
        for f in fields(self):
            if f.name in state:
                setattr(self, f.name, state[f.name])
        self.log_acc = LogInterval(**state["log_acc"])

    def drop_snapshot(self) -> None:
        """Forget the per-rank snapshot once the live objects hold it again (it holds the memory tensors)."""
        self.data_states = self.rng_states = self.memory = None
        self.scheduler_state = self.scaler_state = None


# ---- what a stored state may hold ----------------------------------------------------------------------------

def _count(low: int):
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low, f"an integer >= {low}"


def _seconds(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0


_CHECKS = {
    "train_step": _count(0), "tokens_seen": _count(0), "epoch": _count(1), "batch": _count(0),
    "last_iter": _count(0), "world_size": _count(1), "batch_chunk": _count(1),
    "train_elapsed": (_seconds, "a number of seconds >= 0"),
    "best_val_loss": (lambda v: v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)
                                            and math.isfinite(v)), "a finite number or none"),
    "scheduler_state": (lambda v: v is None or isinstance(v, dict), "a mapping or none"),
    "scaler_state": (lambda v: v is None or isinstance(v, dict), "a mapping or none"),
    "noise_acc": (lambda v: v is None or isinstance(v, dict), "a mapping or none"),
}
_LOG_ACC = {"loss": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
            "steps": _count(0), "tokens": _count(0), "elapsed": (_seconds, "a number of seconds >= 0")}


def check_state_values(state: dict) -> None:
    """Every field of a stored TrainState has the type and range the loop relies on (one line otherwise)."""
    for name, (ok, expected) in _CHECKS.items():
        if name in state and not ok(state[name]):
            raise UserError(f"the training state's {name} is {state[name]!r}, expected {expected}")
    acc = state["log_acc"]
    if not isinstance(acc, dict) or set(acc) != set(_LOG_ACC):
        raise UserError(f"the training state's log_acc is {acc!r}, expected a mapping of {', '.join(_LOG_ACC)}")
    for name, (ok, expected) in _LOG_ACC.items():
        if not ok(acc[name]):
            raise UserError(f"the training state's log_acc.{name} is {acc[name]!r}, expected {expected}")
    for name in ("data_states", "rng_states", "memory"):
        value = state[name]
        if value is not None and (not isinstance(value, list) or len(value) != state["world_size"]):
            raise UserError(f"the training state's {name} has {len(value) if isinstance(value, list) else value!r} "
                            f"entries, expected one per process ({state['world_size']})")
