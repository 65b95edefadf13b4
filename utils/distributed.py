"""Process-group helpers: rank and world size from the environment (torchrun, Slurm), setup, reductions.

Everything works in a single process without a process group (every helper then is the identity), so the
same training code runs on one CPU, one GPU, or many processes.
"""
import datetime
import os
import torch
import torch.distributed as dist


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    return int(value) if value.strip() else default


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else env_int("RANK", 0)


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else env_int("WORLD_SIZE", 1)


def is_main_process() -> bool:
    return get_rank() == 0


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def init_distributed(device: torch.device, timeout_s: float = 1800.0) -> bool:
    """Join the process group when launched with WORLD_SIZE > 1 (torchrun sets RANK, WORLD_SIZE, MASTER_*).

    NCCL on CUDA devices, gloo on the CPU. `timeout_s` bounds every collective, so a dead peer ends the job
    with an error instead of a hang. Returns True when a process group was created.
    """
    if env_int("WORLD_SIZE", 1) <= 1 or is_initialized():
        return is_initialized()
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, init_method="env://",
                            timeout=datetime.timedelta(seconds=timeout_s))
    return True


def barrier() -> None:
    if is_initialized():
        dist.barrier()
    elif torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


_OPS = {
    "sum": dist.ReduceOp.SUM if dist.is_available() else None,
    "max": dist.ReduceOp.MAX if dist.is_available() else None,
    "min": dist.ReduceOp.MIN if dist.is_available() else None,
    "product": dist.ReduceOp.PRODUCT if dist.is_available() else None,
}


def all_reduce_item(value: float, op: str = "mean") -> float:
    """Reduce a Python number over all ranks with op in sum | mean | min | max | product."""
    if not is_initialized():
        return value
    backend_device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    tensor = torch.tensor(float(value), dtype=torch.float64, device=backend_device)
    if op == "mean":
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor /= get_world_size()
    else:
        dist.all_reduce(tensor, op=_OPS[op])
    return tensor.item()
