"""Device and precision choices shared by train.py and eval.py."""
import contextlib
import logging
import os
import platform
from typing import Callable, Optional

import torch

from utils.io.errors import UserError
from utils.runtime.cpu_allocator import tune_cpu_allocator


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


def check_process_count(processes: int, cuda: Optional[bool]) -> Optional[str]:
    """Before a launch of `processes` processes: more on this machine than its visible GPUs is refused in one
    line; several processes without a GPU get a one-line note (returned) saying that they run on the CPU. The
    processes on this machine: $LOCAL_WORLD_SIZE when the launcher sets it (run.sub: tasks per node), else all."""
    processes = int(os.environ.get("LOCAL_WORLD_SIZE") or processes)
    gpus = torch.cuda.device_count() if cuda is not False and torch.cuda.is_available() else 0
    if gpus and processes > gpus:
        raise UserError(f"{processes} processes but {gpus} GPU(s) visible: start one process per GPU ({gpus}), or "
                        "pass --no_cuda to run CPU processes")
    if not gpus and processes > 1:
        why = "--no_cuda" if cuda is False else "no GPU found"
        return (f"note: {why}: starting {processes} CPU processes (gloo, {os.environ.get('OMP_NUM_THREADS', 'all')} "
                "thread(s) each)")
    return None


def environment_summary(device: torch.device) -> str:
    """One log line on the software and the hardware (the reference logged torch's collect_env instead)."""
    parts = [f"python {platform.python_version()}", f"torch {torch.__version__}"]
    if device.type == "cuda":
        parts.append(f"CUDA {torch.version.cuda}, {torch.cuda.device_count()} x {torch.cuda.get_device_name(device)}")
    else:
        parts.append(f"CPU with {os.cpu_count()} cores, {torch.get_num_threads()} threads")
    return "Environment: " + ", ".join(parts)


def amp_dtype(args) -> torch.dtype | None:
    if args.bf16:
        return torch.bfloat16
    if args.fp16:
        return torch.float16
    return None


def amp_context(args, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of autocast contexts for --fp16 / --bf16 (a null context in float32)."""
    dtype = amp_dtype(args)
    if dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def scaler_options(args) -> dict:
    """Dynamic loss scaling for --fp16 only (bf16 has float32's range and needs none), from --init_loss_scale."""
    return {"init_scale": args.init_loss_scale, "enabled": bool(args.fp16)}


def grad_scaler(args, device: torch.device) -> torch.amp.GradScaler:
    return torch.amp.GradScaler(device.type, **scaler_options(args))


# ---- speed: automatic flags, backends, compilation, the CPU allocator ----------------------------------------

def resolve_speed_flags(args, device: torch.device):
    """`args` with the automatic speed flags filled in for `device` (a new configuration; the resolved values
    are logged and dumped).

    --compile     on for CUDA; off on the CPU, where compiling costs more than a short run gains
    --attn_impl   auto -> sdpa on CUDA (fused kernel with the position term as a bias), math on the CPU
    --tf32        on for CUDA (float32 matmuls on tensor cores, as in the reference's container)
    """
    if args.cuda_graphs and device.type != "cuda":
        raise UserError("--cuda_graphs needs a GPU (this run is on the CPU); drop --cuda_graphs")
    if args.attn_impl == "triton":
        from utils.model import triton_rel_attention
        if not triton_rel_attention.runs_on(device):
            raise UserError("--attn_impl triton needs the triton package and a GPU (on the CPU only Triton's slow "
                            "interpreter runs it, with TRITON_INTERPRET=1); use --attn_impl sdpa or math")
    changes = {}
    if args.compile is None:                  # train.py reads it
        changes["compile"] = device.type == "cuda"
    if args.attn_impl == "auto":
        changes["attn_impl"] = "sdpa" if device.type == "cuda" else CPU_ATTN_IMPL
    if args.tf32 is None:
        changes["tf32"] = device.type == "cuda"
    return args.replace(**changes)


# the faster implementation on the CPU, measured with scripts/benchmark_train.py (docs in README.md)
CPU_ATTN_IMPL = "math"


def configure_backends(args, device: torch.device) -> None:
    """Process-wide numeric and allocator settings for the run."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = bool(args.tf32)
        torch.backends.cudnn.allow_tf32 = bool(args.tf32)
    else:
        tune_cpu_allocator()


def compile_model(model: torch.nn.Module, args) -> torch.nn.Module:
    """torch.compile of the training model (--compile), static shapes; CUDA graphs with --cuda_graphs.

    With --softmax_tail_capacity the whole training forward (output layer included: static adaptive-softmax
    shapes, utils/model/adaptive_nll.py) and its backward compile as one graph without breaks; without it the
    adaptive softmax's exact-size part runs eagerly (one graph break, one read-back per step). A segment with an
    empty memory (the first) and one with a full memory are two shapes, so two graphs. With --varlen the
    segments are padded to a few bucket lengths (--varlen_buckets): one graph per bucket.
    """
    if not args.compile:
        return model
    if next(model.parameters()).device.type == "cpu":
        # dropout through ATen's random ops, not inductor's own per-element generator: on the CPU inductor's
        # generator cost more than the rest of a layer's elementwise work (each mask made in the forward and
        # again in the backward; about 6% of a compiled WikiText-103-vocabulary step on one thread), and the
        # masks are then the eager model's for the same seed
        import torch._inductor.config
        torch._inductor.config.fallback_random = True
    mode = "reduce-overhead" if args.cuda_graphs else None
    compiled = torch.compile(model, dynamic=False, mode=mode)
    if getattr(args, "varlen", False):
        # segments padded to a few bucket lengths: one graph per bucket (utils/model/varlen_padding.py)
        from utils.model import varlen_padding
        return varlen_padding.enable(model, compiled, args)
    return compiled
