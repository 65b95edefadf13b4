"""Learning-rate schedules of the reference trainer (`--scheduler`), with its first-step bug fixed.

Notation: t = the 1-based index of an optimizer step, lr0 = `--lr`, W = `--warmup_step`,
M = `--max_step_scheduler` or else `--max_step`. Optimizer step t runs with lr(t):

    cosine    t < W:  lr0 * t / W
              t >= W: eta_min + (lr0 - eta_min) * (1 + cos(pi * (min(t, M) - W) / (M - W))) / 2
                      (= lr0 at t = W, = eta_min from t = M on; eta_min for every t >= W when M <= W)
    inv_sqrt  lr0 * (t / W**1.5 if t <= W else 1 / sqrt(t))      (W = 0: lr0 / sqrt(t); peak lr0 / sqrt(W))
    dev_perf  level * min(1, t / W), where level starts at lr0 and is multiplied by --decay_rate (not below
              --lr_min) whenever the validation loss has not improved for more than --patience evals
              (ReduceLROnPlateau semantics: mode min, relative threshold 1e-4, no cooldown)
    constant  lr0 * min(1, t / W)
    linear    t < W:  lr0 * t / W;   t >= W: lr_min + (lr0 - lr_min) * max(0, (M - t) / (M - W))   (ours)

Token-based schedules (--warmup_tokens / --max_tokens, utils/training/batch_schedule.py): t is then the
nominal number of tokens trained after step t (BatchPlan.tokens_at), W --warmup_tokens (or the tokens of
--warmup_step steps) and M --max_tokens (or the tokens of the step horizon); inv_sqrt then reads 1 / sqrt(tokens).
LR scaling (--lr_scaling, utils/training/lr_scaling.py): the LR of step t is multiplied by the factor of its
global batch.

Differences from the reference (§3.3): the reference set the schedule's value for step t after step t, so its
step t ran with lr(t - 1) and its first step with the full lr0 (inv_sqrt: with 0); here step 1 runs with lr(1).
`constant` crashed in the reference. The cosine stays at eta_min past M (the reference's closed form turned
back up). dev_perf reductions scale the warm-up target, instead of being overwritten during warm-up.

Use: `scheduler = build_scheduler(args, optimizer)` sets lr(1); after optimizer step t call
`scheduler.step(t)` (sets lr(t + 1)); after each evaluation call `scheduler.step_eval(val_loss)`.
All parameter groups get the same LR (the trainer uses one group).
"""
import math
from typing import Any

import torch

from utils.config.schema import SCHEDULERS
from utils.io.errors import UserError

# ReduceLROnPlateau defaults used by the reference's dev_perf schedule
_PLATEAU_THRESHOLD = 1e-4
_PLATEAU_EPS = 1e-8


class LRScheduler:
    """Sets the learning rate of `optimizer` for the next optimizer step (formulas: module docstring)."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        scheduler: str,
        lr: float,
        warmup_step: int = 0,
        max_step: int = 1,
        eta_min: float = 0.0,
        decay_rate: float = 0.5,
        patience: int = 0,
        lr_min: float = 0.0,
        plan=None,
    ):
        if scheduler not in SCHEDULERS:
            raise UserError(f"unknown --scheduler {scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
        if warmup_step < 0:
            raise UserError(f"--warmup_step must be >= 0, got {warmup_step}")
        if scheduler == "dev_perf" and not 0.0 < decay_rate < 1.0:
            raise UserError(f"--decay_rate must be in (0, 1) for --scheduler dev_perf, got {decay_rate}")
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.lr0 = float(lr)
        self.warmup_step = int(warmup_step)
        self.max_step = int(max_step)
        self.eta_min = float(eta_min)
        self.decay_rate = float(decay_rate)
        self.patience = int(patience)
        self.lr_min = float(lr_min)
        self.plan = plan  # BatchPlan: the LR factor of each step's batch and, with token units, its tokens
        # mutable state (state_dict)
        self.last_step = 0  # optimizer steps taken
        self.level = self.lr0  # dev_perf: current plateau LR
        self.best = math.inf  # dev_perf: best validation loss so far
        self.num_bad_evals = 0  # dev_perf: evals without improvement
        self._apply()

    def lr_at(self, t: int) -> float:
        """The learning rate of optimizer step t (1-based)."""
        w, lr0 = self.warmup_step, self.lr0
        if self.scheduler == "inv_sqrt":
            if w > 0 and t <= w:
                return lr0 * t / w ** 1.5
            return lr0 / math.sqrt(max(t, 1))
        warm = min(1.0, t / w) if w > 0 else 1.0
        if self.scheduler == "constant":
            return lr0 * warm
        if self.scheduler == "dev_perf":
            return self.level * warm
        if self.scheduler == "linear":
            if t < w:
                return lr0 * warm
            span = self.max_step - w
            if span <= 0 or t >= self.max_step:
                return self.lr_min
            return self.lr_min + (lr0 - self.lr_min) * (self.max_step - t) / span
        # cosine
        if t < w:
            return lr0 * warm
        span = self.max_step - w
        if span <= 0 or t >= self.max_step:
            return self.eta_min
        return self.eta_min + (lr0 - self.eta_min) * (1 + math.cos(math.pi * (t - w) / span)) / 2

    @property
    def lr(self) -> float:
        """The learning rate the next optimizer step will use."""
        t = self.last_step + 1
        if self.plan is None:
            return self.lr_at(t)
        clock = self.plan.tokens_at(t) if self.plan.token_unit else t
        return self.lr_at(clock) * self.plan.lr_scale_at(t)

    def step(self, train_step: int) -> float:
        """Call after optimizer step `train_step` (1-based): sets and returns lr(train_step + 1)."""
        self.last_step = int(train_step)
        return self._apply()

    def step_eval(self, val_loss: float) -> float:
        """Call after each evaluation; only dev_perf reacts (plateau reduction). Returns the next step's LR."""
        if self.scheduler != "dev_perf":
            return self.lr
        val_loss = float(val_loss)
        if val_loss < self.best * (1 - _PLATEAU_THRESHOLD):
            self.best = val_loss
            self.num_bad_evals = 0
        else:
            self.num_bad_evals += 1
        if self.num_bad_evals > self.patience:
            new_level = max(self.level * self.decay_rate, self.lr_min)
            if self.level - new_level > _PLATEAU_EPS:
                self.level = new_level
            self.num_bad_evals = 0
        return self._apply()

    def _apply(self) -> float:
        lr = self.lr
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def state_dict(self) -> dict[str, Any]:
        """Plain Python types only (checkpoints load with weights_only=True)."""
        return {
            "scheduler": self.scheduler,
            "last_step": self.last_step,
            "level": self.level,
            "best": self.best,
            "num_bad_evals": self.num_bad_evals,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the position in the schedule and set the LR of the next step. The hyper-parameters
        (lr, warmup, horizon, ...) come from the current configuration."""
        if state.get("scheduler", self.scheduler) != self.scheduler:
            raise UserError(
                f"the checkpoint was trained with --scheduler {state['scheduler']}, this run uses "
                f"--scheduler {self.scheduler}; pass --scheduler {state['scheduler']} to resume"
            )
        self.last_step = int(state["last_step"])
        self.level = float(state.get("level", self.lr0))
        self.best = float(state.get("best", math.inf))
        self.num_bad_evals = int(state.get("num_bad_evals", 0))
        self._apply()


def build_scheduler(args, optimizer: torch.optim.Optimizer, plan=None) -> LRScheduler:
    """The schedule selected by `args.scheduler`, with lr(1) already set on `optimizer`; `plan` (a BatchPlan)
    adds LR scaling and token units."""
    warmup, horizon = args.warmup_step, args.max_step_scheduler or args.max_step
    if plan is not None and plan.token_unit:
        warmup = args.warmup_tokens if args.warmup_tokens is not None else plan.tokens_at(warmup)
        horizon = args.max_tokens if args.max_tokens is not None and not args.max_step_scheduler \
            else plan.tokens_at(horizon)
    return LRScheduler(
        optimizer,
        args.scheduler,
        lr=args.lr,
        warmup_step=warmup,
        max_step=horizon,
        eta_min=args.eta_min,
        decay_rate=args.decay_rate,
        patience=args.patience,
        lr_min=args.lr_min,
        plan=plan,
    )
