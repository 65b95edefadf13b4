"""Device and precision choices shared by train.py and eval.py."""
import contextlib
import logging
import os
import platform
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


def environment_summary(device: torch.device) -> str:
    """One log line on the software and the hardware (the reference logged torch's collect_env instead)."""
    parts = [f"python {platform.python_version()}", f"torch {torch.__version__}"]
    if device.type == "cuda":
        parts.append(f"CUDA {torch.version.cuda}, {torch.cuda.device_count()} x {torch.cuda.get_device_name(device)}")
    else:
        parts.append(f"CPU with {os.cpu_count()} cores, {torch.get_num_threads()} threads")
    return "Environment: " + ", ".join(parts)


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
