"""Refuse a run whose model and batch cannot fit the device's memory, before anything large is allocated.

The estimate is a lower bound, so it never refuses a run that would fit: float32 weights, their gradients
and the optimizer's state (per process: divided over the processes with --multi_gpu fsdp), the memory carried
between segments, and, with a full softmax, the one [tokens, vocabulary] float32 buffer the output layer needs.
Activations, DDP's gradient buckets and allocator overhead come on top and are not counted.
"""
from typing import Optional

import torch

from utils.io.errors import UserError

GIB = 1024 ** 3
# float32 values kept per parameter by each optimizer besides the weight and its gradient
OPTIMIZER_VALUES = {"adam": 2, "lamb": 2, "jitlamb": 2, "adagrad": 1, "sgd": 0}


def needed_bytes(n_params: int, args, model_config: dict, world_size: int) -> dict[str, int]:
    """The parts of the lower bound, in bytes, for one process."""
    optimizer = OPTIMIZER_VALUES.get(args.optim, 2) + (1 if args.optim == "sgd" and args.mom > 0 else 0)
    per_param = 4 * (2 + optimizer)
    shards = world_size if args.multi_gpu == "fsdp" else 1
    local_batch = args.batch_size // max(world_size, 1)
    chunk = max(local_batch // args.batch_chunk, 1)
    parts = {"weights, gradients and optimizer state": n_params * per_param // shards,
             "memory": (model_config["n_layer"] + 1) * args.mem_len * local_batch * model_config["d_model"] * 4}
    if not model_config.get("cutoffs"):
        parts["output layer"] = args.tgt_len * chunk * model_config["n_token"] * 4
    return parts


def available_bytes(device: torch.device) -> Optional[int]:
    """Free memory of the device: the GPU's, or the machine's available memory (Linux); None when unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_memory(n_params: int, args, model_config: dict, device: torch.device, world_size: int = 1) -> None:
    """One line, before the model is built, when the lower bound exceeds the free memory of `device` (each
    process of one machine needs it on its own device; on the CPU they share the machine's)."""
    available = available_bytes(device)
    if available is None:
        return
    parts = needed_bytes(n_params, args, model_config, world_size)
    need = sum(parts.values())
    sharing = world_size if device.type == "cpu" else 1
    if need * sharing <= available:
        return
    where = f"the GPU {device}" if device.type == "cuda" else "this machine"
    detail = ", ".join(f"{name} {size / GIB:.1f} GiB" for name, size in parts.items() if size >= GIB / 100)
    procs = f" x {sharing} processes" if sharing > 1 else ""
    raise UserError(f"the model and batch need at least {need / GIB:.1f} GiB{procs} ({n_params / 1e6:.0f}M "
                    f"parameters; {detail}), {where} has {available / GIB:.1f} GiB free: use a smaller model or "
                    "--batch_size, a larger --batch_chunk, or --multi_gpu fsdp over several GPUs")
