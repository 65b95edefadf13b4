"""Device and precision choices shared by train.py and eval.py."""
import contextlib
import logging
from typing import Callable

import torch


def select_device(args, log: logging.Logger) -> torch.device:
    """CUDA when a GPU is present (device LOCAL_RANK), unless --no_cuda; the CPU otherwise.

    `--cuda` on a machine without a GPU warns and runs on the CPU instead of failing.
    """
    if args.cuda is False:
        return torch.device("cpu")
    if torch.cuda.is_available():
        index = args.local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    if args.cuda:
        log.warning("--cuda: no GPU found, running on the CPU")
    return torch.device("cpu")


def amp_dtype(args) -> torch.dtype | None:
    if getattr(args, "bf16", False):
        return torch.bfloat16
    if getattr(args, "fp16", False):
        return torch.float16
    return None


def amp_context(args, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of autocast contexts for --fp16 / --bf16 (a null context in float32)."""
    dtype = amp_dtype(args)
    if dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(args, device: torch.device) -> torch.amp.GradScaler:
    """Dynamic loss scaling for --fp16 only (bf16 has float32's range and needs none)."""
    return torch.amp.GradScaler(device.type, enabled=bool(getattr(args, "fp16", False)))
