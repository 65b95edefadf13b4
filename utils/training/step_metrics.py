"""The per-step numbers of training (loss, gradient norm, non-finite values), kept on the device between log
intervals so that a training step never waits for the device (issue 18: no host syncs between log intervals).

    acc = StepMetrics(device)
    acc.add(step, loss, grad_norm)          # device tensors; no read-back
    ...
    acc.flush(state.log_acc, guard)         # at a log interval / before a checkpoint: ONE read-back

The loss sum is kept in float64 and starts from the host's running sum (`LogInterval.loss`), and every step
adds its float32 loss in the same order as the host did before (`acc.loss += loss.item()`), so the logged
averages and the resumed runs are bit for bit those of the read-every-step loop.

A non-finite loss (or gradient norm, when `check_grad_norm`) is remembered with the first step that had it;
`flush` raises TrainingDiverged for it, naming that step. The loop flushes before every checkpoint, so a
checkpoint never holds the weights of a diverged run.
"""
from typing import Optional

import torch
from torch import Tensor

from utils.training.divergence import DivergenceGuard
from utils.training.state import LogInterval


class StepMetrics:
    def __init__(self, device: torch.device, check_grad_norm: bool = True):
        self.device = device
        self.check_grad_norm = check_grad_norm
        self._loss_sum: Optional[Tensor] = None       # float64, starts at LogInterval.loss
        self._grad_norm: Optional[Tensor] = None      # the last step's
        # first step with a non-finite loss / gradient norm (-1: none) and its value
        self._bad_loss = torch.full((2,), -1.0, dtype=torch.float64, device=device)
        self._bad_norm = torch.full((2,), -1.0, dtype=torch.float64, device=device)
        self.pending = 0                              # steps added since the last flush
        self.last_grad_norm: Optional[float] = None   # read back by the last flush

    def add(self, step: int, loss: Tensor, grad_norm: Tensor, log_acc: LogInterval) -> None:
        """Record one step (device tensors: 0-dim float32 loss and gradient norm); no read-back."""
        loss64 = loss.detach().to(torch.float64)
        if self._loss_sum is None:
            self._loss_sum = torch.full((), log_acc.loss, dtype=torch.float64, device=self.device)
        self._loss_sum = self._loss_sum + loss64
        grad_norm = grad_norm.detach()
        if hasattr(grad_norm, "full_tensor"):                # a DTensor (FSDP): its full value, on the device
            grad_norm = grad_norm.full_tensor()
        self._grad_norm = grad_norm
        self._bad_loss = _first_bad(self._bad_loss, step, loss64)
        if self.check_grad_norm:
            self._bad_norm = _first_bad(self._bad_norm, step, grad_norm.to(torch.float64))
        self.pending += 1

    def flush(self, log_acc: LogInterval, guard: DivergenceGuard) -> Optional[float]:
        """Read the device numbers back (one transfer), put the loss sum into `log_acc`, raise for a non-finite
        value; returns the last step's gradient norm (None before the first step)."""
        if self.pending == 0:
            return self.last_grad_norm
        values = torch.cat([self._loss_sum.reshape(1), self._grad_norm.to(torch.float64).reshape(1),
                            self._bad_loss, self._bad_norm]).tolist()
        loss_sum, grad_norm, bad_loss_step, bad_loss, bad_norm_step, bad_norm = values
        self.pending = 0
        self.last_grad_norm = grad_norm
        log_acc.loss = loss_sum
        # the earlier of the two, the loss first within a step (as the loop checked them after each step)
        found = [(step, order, what, value) for step, order, what, value in
                 ((bad_loss_step, 0, "training loss", bad_loss), (bad_norm_step, 1, "gradient norm", bad_norm))
                 if step >= 0]
        for step, _, what, value in sorted(found):
            guard.check(int(step), what, value)
        return grad_norm

    def restart_interval(self) -> None:
        """A new log interval: the next loss sum starts from LogInterval.loss (0 for a fresh interval)."""
        self._loss_sum = None


def _first_bad(record: Tensor, step: int, value: Tensor) -> Tensor:
    """record = [step, value] of the first non-finite value so far ([-1, -1]: none)."""
    new = torch.stack([torch.full_like(value, float(step)), value])
    take = (record[0] < 0) & ~torch.isfinite(value)
    return torch.where(take, new, record)
