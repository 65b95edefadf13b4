"""The gradient noise scale (`--log_noise_scale`): McCandlish et al., "An Empirical Model of Large-Batch
Training" (2018), the "simple" estimator B_simple = tr(Sigma) / |G|^2, from what a step already computes.

A step of global batch B (sequences) is split into k = --batch_chunk chunks of b = B / (world size x k)
sequences per rank. The gradient accumulated after each chunk's backward minus the one before it is that
chunk's gradient (times 1/k, the loss scaling of the chunks); its squared norm is a small-batch sample
|G_b|^2. The step's gradient norm (before clipping, every rank's together) gives |G_B|^2. As
E|G_n|^2 = |G|^2 + tr(Sigma) / n for a batch of n examples (here: sequences),

    |G|^2     ~ (B |G_B|^2 - b S) / (B - b)            S = mean over the chunks of |G_b|^2
    tr(Sigma) ~ (S - |G_B|^2) / (1/b - 1/B)

(appendix A.1 of the paper). Both are summed over the steps of a log interval on the device and divided at
the log line (the paper's advice: average numerator and denominator separately, not the noisy ratio); no
extra backward pass, no host sync in the step. With DDP the last chunk's backward all-reduces the gradients,
so its own gradient is not seen: the first k - 1 chunks are the samples. With DDP and k = 1 each rank's
gradient is the sample (b = the rank's share), its norm taken by a DDP communication hook before the
all-reduce (utils/distributed/comm_hooks.py); the parts are averaged over the ranks at the log line.
The cost: one copy of the gradients per chunk and a few norms, only with the flag.
The noise scale is in sequences; times --tgt_len it is in tokens.
"""
from typing import Optional

import torch


class NoiseScaleMeter:
    """Hooks of TrainStep (`after_backward`, `after_step`) accumulating the estimator's two parts."""

    def __init__(self, parameters, chunks: int, sees_last_chunk: bool, scaler=None):
        self.params = [p for p in parameters if p.requires_grad]
        self.chunks, self.sees_last_chunk, self.scaler = chunks, sees_last_chunk, scaler
        self.global_batch = self.local_batch = 0            # set by the trainer before each step
        self._prev: Optional[list] = None
        self._small_sum: Optional[torch.Tensor] = None
        self._samples = 0
        self._rank_sum: Optional[torch.Tensor] = None        # DDP, one chunk: this rank's squared gradient norm
        self.reset()

    def reset(self) -> None:
        """Start a new log interval."""
        self.grad_sq = self.trace = None                    # device tensors (sums over the interval)
        self.steps = 0

    def _grads(self) -> list:
        return [p.grad for p in self.params]

    @torch.no_grad()
    def after_backward(self, chunk: int) -> None:
        """After chunk `chunk`'s backward: add its gradient's squared norm to the step's small-batch samples."""
        last = chunk == self.chunks - 1
        if chunk == 0:
            self._prev, self._small_sum, self._samples = None, None, 0
        if last and not self.sees_last_chunk:
            self._prev = None
            return
        grads = self._grads()
        squares = []
        for i, g in enumerate(grads):
            if g is None:
                continue
            prev = None if self._prev is None else self._prev[i]
            delta = g if prev is None else g - prev
            squares.append(delta.double().pow(2).sum())
        if squares:
            sq = torch.stack(squares).sum() * self.chunks ** 2   # the chunk's loss was divided by k
            self._small_sum = sq if self._small_sum is None else self._small_sum + sq
            self._samples += 1
        self._prev = None if last else [None if g is None else g.detach().clone() for g in grads]

    def add_rank_square(self, square: torch.Tensor) -> None:
        """DDP with one chunk (utils/distributed/comm_hooks.py): a bucket's squared norm of this rank's gradient,
        before the all-reduce; the rank's whole gradient is the step's one small-batch sample."""
        self._rank_sum = square if self._rank_sum is None else self._rank_sum + square

    @torch.no_grad()
    def after_step(self, grad_norm: torch.Tensor) -> None:
        """After the gradient norm of the step (unscaled, before clipping): the step's estimates."""
        if self._rank_sum is not None:
            self._small_sum, self._samples, self._rank_sum = self._rank_sum, 1, None
        if self._small_sum is None:
            return
        small = self._small_sum / self._samples
        if self.scaler is not None and self.scaler.is_enabled():
            small = small / self.scaler._scale.double() ** 2     # the chunks' gradients were loss-scaled
        big = torch.as_tensor(grad_norm).to(small.device, torch.float64) ** 2
        b, B = self.local_batch / self.chunks, self.global_batch
        grad_sq, trace = estimate(small, big, b, B)
        self.grad_sq = grad_sq if self.grad_sq is None else self.grad_sq + grad_sq
        self.trace = trace if self.trace is None else self.trace + trace
        self.steps += 1
        self._prev = self._small_sum = None

    def state_dict(self) -> dict:
        """The open interval's sums as plain numbers (a checkpoint; float64 round-trips exactly)."""
        return {"grad_sq": None if self.grad_sq is None else float(self.grad_sq),
                "trace": None if self.trace is None else float(self.trace), "steps": self.steps}

    def load_state_dict(self, saved: Optional[dict], rank: int, device) -> None:
        """This rank's sums from a checkpoint's `noise_acc` ({"ranks": [state_dict per rank]}); another number of
        processes (or none saved) starts the interval afresh."""
        self.reset()
        ranks = (saved or {}).get("ranks") or []
        state = ranks[rank] if rank < len(ranks) and isinstance(ranks[rank], dict) else None
        if state and state.get("grad_sq") is not None:
            self.grad_sq = torch.tensor(state["grad_sq"], dtype=torch.float64, device=device)
            self.trace = torch.tensor(state["trace"], dtype=torch.float64, device=device)
            self.steps = int(state["steps"])

    def read(self) -> Optional[tuple[float, float]]:
        """(tr(Sigma) sum, |G|^2 sum) of the interval, read to the host (the log line's one sync)."""
        if self.grad_sq is None:
            return None
        return float(self.trace), float(self.grad_sq)


def estimate(small_sq, big_sq, b: float, B: float):
    """(|G|^2, tr(Sigma)) from the mean squared gradient norm of batches of b and that of one batch of B."""
    grad_sq = (B * big_sq - b * small_sq) / (B - b)
    trace = (small_sq - big_sq) / (1.0 / b - 1.0 / B)
    return grad_sq, trace


def interval_record(meter: NoiseScaleMeter, optimizer, metrics, step: int) -> dict:
    """The log interval's `noise_scale` (and its parts) and, with LAMB, the last step's trust ratios (min,
    median, max; their histogram to TensorBoard). Every rank calls it (the parts are averaged over ranks)."""
    from utils.distributed import group as distributed
    record = {}
    parts = meter.read()
    if parts is not None:
        trace = distributed.all_reduce_item(parts[0], "mean")
        grad_sq = distributed.all_reduce_item(parts[1], "mean")
        record.update(noise_scale=trace / grad_sq if grad_sq != 0 else float("inf"), noise_trace=trace,
                      noise_grad_sq=grad_sq)
    meter.reset()
    ratios = getattr(optimizer, "trust_ratios", None)
    if ratios is not None:
        ratios = ratios.detach().float().cpu()
        record.update(trust_ratio_min=float(ratios.min()), trust_ratio_median=float(ratios.median()),
                      trust_ratio_max=float(ratios.max()))
        metrics.histogram("train/trust_ratio", ratios, step)
    return record
