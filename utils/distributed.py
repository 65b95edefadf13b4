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


def init_from_env(args) -> None:
    """Join the process group when torchrun (or Slurm) started several processes.

    The device is not known yet at this point, so the backend follows the availability of CUDA: NCCL when
    GPUs are present and not disabled with --no_cuda, gloo otherwise. WORLD_SIZE > 1 needs --multi_gpu ddp
    (the reference trained unsynchronized replicas without it).
    """
    world_size = env_int("WORLD_SIZE", 1)
    if world_size <= 1:
        return
    from utils.errors import UserError
    if getattr(args, "multi_gpu", "ddp") not in ("ddp", "fsdp") and hasattr(args, "multi_gpu"):
        raise UserError(f"WORLD_SIZE={world_size} but --multi_gpu is {args.multi_gpu}; pass --multi_gpu ddp "
                        "(several processes without it would train unsynchronized copies)")
    use_cuda = torch.cuda.is_available() and args.cuda is not False
    if use_cuda:
        local_rank = env_int("LOCAL_RANK", getattr(args, "local_rank", 0))
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    init_distributed(torch.device("cuda" if use_cuda else "cpu"))


def shutdown() -> None:
    if is_initialized():
        dist.destroy_process_group()


def broadcast_object(obj):
    """rank 0's `obj` on every rank."""
    if not is_initialized():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def gather_objects(obj) -> list | None:
    """Every rank's `obj` as a list on rank 0 (None on the other ranks)."""
    if not is_initialized():
        return [obj]
    out = [None] * get_world_size() if get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on at least one (e.g. a preemption signal seen by one rank)."""
    if not is_initialized():
        return flag
    return all_reduce_item(1.0 if flag else 0.0, "max") > 0


def wrap_model(model: torch.nn.Module, args, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel around `model` when several processes train; the model itself otherwise."""
    if not is_initialized() or get_world_size() == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False,
                                   find_unused_parameters=True)
