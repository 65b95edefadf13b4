"""Learning-rate scaling with the global batch (`--lr_scaling`, `--base_batch_size`).

`--lr` is the learning rate of a global batch of `--base_batch_size` sequences. A run whose global batch is B
trains with lr x factor, where

    none    factor = 1
    linear  factor = B / base                (Goyal et al.: the update per token stays the same)
    sqrt    factor = sqrt(B / base)          (the variance of the update stays the same; more stable for
                                              adaptive optimizers at large batches, NVIDIA's mLSTM finding)

The factor multiplies the whole schedule (warm-up, peak, eta_min, lr_min), so a schedule keeps its shape. With
a batch schedule B is the batch of each step, so the LR follows the batch as it grows.
"""
import math

from utils.io.errors import UserError


def lr_scale(rule: str, batch: int, base_batch: int | None) -> float:
    """The factor of the learning rate at global batch `batch` (sequences)."""
    if rule == "none":
        return 1.0
    if not base_batch:
        raise UserError(f"--lr_scaling {rule} needs --base_batch_size (the global batch --lr is given for)")
    if rule == "linear":
        return batch / base_batch
    if rule == "sqrt":
        return math.sqrt(batch / base_batch)
    raise UserError(f"unknown --lr_scaling {rule!r}; choose none, linear or sqrt")


def describe(args, batch: int) -> str:
    """The start-up line: the rule, the base and the effective learning rate at `batch`."""
    factor = lr_scale(args.lr_scaling, batch, args.base_batch_size)
    if args.lr_scaling == "none":
        return f"lr scaling: none; lr {args.lr:.6g} at global batch {batch}"
    return (f"lr scaling: {args.lr_scaling}; base lr {args.lr:.6g} at global batch {args.base_batch_size}, "
            f"effective lr {args.lr * factor:.6g} at global batch {batch} (x{factor:.6g})")
