"""`train.py --lr_range_test`: the learning-rate range test (Smith, "Cyclical Learning Rates for Training Neural
Networks", 2017; the "LR finder" of the cybertronai Transformer-XL scaling work).

Step i of N = --lr_range_steps trains with lr_i = min * (max / min) ** (i / (N - 1)) (min, max: --lr_range_min,
--lr_range_max), the model, optimizer, batch and memory being those of training (--lr_scaling does not apply:
the test measures the LR of this batch). The loss is smoothed by an exponential moving average (beta 0.98,
bias-corrected); the test stops early once the smoothed loss exceeds 4 x its minimum (or is not finite).

Suggestion: the LR of the steepest descent of the smoothed loss against log(lr) (the most negative slope,
np.gradient over the steps before the smoothed minimum), which sits below the LR where the loss bottoms out.
Files (rank 0, work dir, not with --debug): lr_range_test.jsonl (step, lr, loss, smoothed loss per step) and
lr_range_test.png (loss against lr, log scale, the suggestion marked). With DDP every rank trains its share
and the loss is the mean over ranks.
"""
import io
import json
import math

import numpy as np

from utils.distributed import group as distributed
from utils.io.atomic import write_bytes_atomic, write_text_atomic

SMOOTHING = 0.98
DIVERGENCE = 4.0
RULE = "steepest descent of the smoothed loss against log(lr)"


def lr_schedule(lr_min: float, lr_max: float, steps: int) -> list[float]:
    return [lr_min * (lr_max / lr_min) ** (i / (steps - 1)) for i in range(steps)]


def smooth(losses: list[float]) -> list[float]:
    """The bias-corrected exponential moving average of `losses`."""
    out, avg = [], 0.0
    for i, loss in enumerate(losses, 1):
        avg = SMOOTHING * avg + (1 - SMOOTHING) * loss
        out.append(avg / (1 - SMOOTHING ** i))
    return out


def suggest(lrs: list[float], smoothed: list[float]) -> int:
    """Index of the steepest descent of the smoothed loss against log(lr), before its minimum."""
    end = int(np.argmin(smoothed)) + 1
    if end < 3:
        return max(end - 1, 0)
    slope = np.gradient(np.asarray(smoothed[:end]), np.log(np.asarray(lrs[:end])))
    return int(np.argmin(slope))


def run_lr_range_test(trainer) -> int:
    args, log, state = trainer.args, trainer.log, trainer.state
    lrs = lr_schedule(args.lr_range_min, args.lr_range_max, args.lr_range_steps)
    log.info(f"LR range test: {len(lrs)} steps from {lrs[0]:.3e} to {lrs[-1]:.3e}")
    records, losses = [], []
    step_iter = _batches(trainer)
    for i, lr in enumerate(lrs):
        for group in trainer.optimizer.param_groups:
            group["lr"] = lr
        data, target = next(step_iter)
        loss, _ = trainer.optimizer_step(data, target, trainer.mems)
        state.train_step += 1
        loss = distributed.all_reduce_item(loss, "mean")
        losses.append(loss)
        smoothed = smooth(losses)[-1]
        records.append({"step": i + 1, "lr": lr, "loss": loss, "smoothed_loss": smoothed})
        log.info(f"| lr range test step {i + 1:>5d} | lr {lr:.3e} | loss {loss:7.4f} | smoothed {smoothed:7.4f}")
        best = min(r["smoothed_loss"] for r in records)
        if not math.isfinite(smoothed) or (i >= 10 and smoothed > DIVERGENCE * best):
            log.info(f"LR range test: the smoothed loss exceeds {DIVERGENCE:g}x its minimum, stopping")
            break
    finite = [r for r in records if math.isfinite(r["smoothed_loss"])]
    index = suggest([r["lr"] for r in finite], [r["smoothed_loss"] for r in finite])
    suggested = finite[index]["lr"]
    if trainer.rank == 0 and not args.debug:
        write_text_atomic(trainer.work_dir / "lr_range_test.jsonl", "".join(json.dumps(r) + "\n" for r in records))
        write_bytes_atomic(trainer.work_dir / "lr_range_test.png", _plot(records, suggested))
    log.info(f"suggested lr: {suggested:.6g} (rule: {RULE}; at loss {finite[index]['smoothed_loss']:.4f}, start "
             f"{records[0]['loss']:.4f})")
    return 0


def _batches(trainer):
    """Training batches, epoch after epoch."""
    while True:
        trainer._start_epoch()
        for data, target, _, _ in trainer.train_iter:
            yield data, target


def _plot(records: list[dict], suggested: float) -> bytes:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    lrs = [r["lr"] for r in records]
    ax.plot(lrs, [r["loss"] for r in records], alpha=0.4, label="loss")
    ax.plot(lrs, [r["smoothed_loss"] for r in records], label="smoothed loss")
    ax.axvline(suggested, color="red", linestyle="--", label=f"suggested lr {suggested:.3g}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()
