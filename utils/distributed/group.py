"""Process-group helpers: rank and world size from the environment (torchrun, Slurm), setup, reductions.

Everything works in a single process without a process group (every helper then is the identity), so the
same training code runs on one CPU, one GPU, or many processes.

Launchers: torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. A task started by
Slurm's `srun` (one process per GPU, no torchrun) has SLURM_PROCID, SLURM_STEP_NUM_TASKS and SLURM_LOCALID
instead; `adopt_slurm_env` turns those into the torchrun variables, with the first node of the step as
MASTER_ADDR (unless MASTER_ADDR / MASTER_PORT are set, as run.sub does).
"""
import contextlib
import datetime
import logging
import os
import re
import torch
import torch.distributed as dist

LOG = logging.getLogger("txl")

DEFAULT_TIMEOUT_S = 600.0


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    return int(value) if value.strip() else default


def first_host(nodelist: str) -> str:
    """The first host name of a Slurm node list: 'gpu[07-09,12],cpu1' -> 'gpu07', 'node3' -> 'node3'."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not match:
        raise ValueError(f"cannot read the Slurm node list {nodelist!r}")
    prefix, ranges = match.groups()
    if ranges is None:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def adopt_slurm_env(environ=os.environ) -> bool:
    """In a task of a multi-task `srun` step not started by torchrun: set RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT from Slurm's variables. Returns True when it did.

    Only a job step counts (SLURM_STEP_ID is set): a batch script or an salloc shell has SLURM_NTASKS too,
    but runs one process, which must not wait for peers that never start.
    """
    if "RANK" in environ or "SLURM_STEP_ID" not in environ or "SLURM_PROCID" not in environ:
        return False
    world_size = int(environ.get("SLURM_STEP_NUM_TASKS") or environ.get("SLURM_NTASKS") or 1)
    if world_size <= 1:
        return False
    environ["RANK"] = environ["SLURM_PROCID"]
    environ["WORLD_SIZE"] = str(world_size)
    environ["LOCAL_RANK"] = environ.get("SLURM_LOCALID", "0")
    nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST") or "localhost"
    environ.setdefault("MASTER_ADDR", first_host(nodelist))
    environ.setdefault("MASTER_PORT", str(20000 + int(environ.get("SLURM_JOB_ID", "0")) % 20000))
    return True


# With tensor parallelism (utils/distributed/tensor_parallel.py) the processes form a (dp, tp) mesh: the data,
# the metrics and the training state see the data-parallel ranks only. None: every process is one of them.
_DATA_PARALLEL: tuple | None = None        # (data-parallel rank, data-parallel size, tensor-parallel size, group)


def set_data_parallel(rank: int, size: int, tp_size: int, group) -> None:
    global _DATA_PARALLEL
    _DATA_PARALLEL = (rank, size, tp_size, group)


def dp_rank() -> int:
    """This process's data-parallel rank (its batch columns, its memory and data position)."""
    return _DATA_PARALLEL[0] if _DATA_PARALLEL else get_rank()


def dp_world_size() -> int:
    return _DATA_PARALLEL[1] if _DATA_PARALLEL else get_world_size()


def tp_world_size() -> int:
    return _DATA_PARALLEL[2] if _DATA_PARALLEL else 1


def dp_group():
    """The process group of this rank's data-parallel peers (None: all processes)."""
    return _DATA_PARALLEL[3] if _DATA_PARALLEL else None


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else env_int("RANK", 0)


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else env_int("WORLD_SIZE", 1)


def is_main_process() -> bool:
    return get_rank() == 0


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def init_distributed(device: torch.device, timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """Join the process group when launched with WORLD_SIZE > 1 (torchrun sets RANK, WORLD_SIZE, MASTER_*).

    NCCL on CUDA devices, gloo on the CPU. `timeout_s` bounds the wait for the other processes to join and
    every collective, so a peer that never starts or dies ends the job with an error instead of a hang.
    Returns True when a process group was created.
    """
    if env_int("WORLD_SIZE", 1) <= 1 or is_initialized():
        return is_initialized()
    from utils.io.errors import UserError
    backend = "nccl" if device.type == "cuda" else "gloo"
    rank, world_size = env_int("RANK", 0), env_int("WORLD_SIZE", 1)
    where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    timeout = datetime.timedelta(seconds=timeout_s)
    try:
        store, rank, world_size = next(dist.rendezvous("env://", timeout=timeout))
        # torchrun keeps one store for every restart of the workers (--max-restarts): without a prefix per
        # attempt, a restarted rank could read the address a dead rank of the failed attempt left there
        store = dist.PrefixStore(f"txl/attempt_{env_int('TORCHELASTIC_RESTART_COUNT', 0)}", store)
        dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
    except (dist.DistError, RuntimeError, ValueError, TimeoutError) as exc:
        raise UserError(f"rank {rank} of {world_size}: the processes did not meet at {where} within "
                        f"{timeout_s:.0f} s ({first_line(exc)}); check that all {world_size} processes started, "
                        "that MASTER_ADDR/MASTER_PORT point at rank 0's host and a free port, or raise "
                        "--dist_timeout") from None
    return True


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


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


def all_reduce_item(value: float, op: str = "mean", group=None) -> float:
    """Reduce a Python number over all ranks (or those of `group`) with op in sum | mean | min | max | product."""
    if not is_initialized():
        return value
    backend_device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    tensor = torch.tensor(float(value), dtype=torch.float64, device=backend_device)
    if op == "mean":
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
        tensor /= dist.get_world_size(group)
    else:
        dist.all_reduce(tensor, op=_OPS[op], group=group)
    return tensor.item()


def init_from_env(args):
    """Join the process group when torchrun (or Slurm's srun) started several processes; returns `args` with
    --multi_gpu resolved.

    The device is not known yet at this point, so the backend follows the availability of CUDA: NCCL when
    GPUs are present and not disabled with --no_cuda, gloo otherwise. Several processes train with DDP
    unless --multi_gpu fsdp asks for sharding (the reference silently trained unsynchronized copies when
    --multi_gpu was not ddp); --multi_gpu dp is a single-process mode and is refused.
    """
    world_size = env_int("WORLD_SIZE", 1)
    tensor_parallel = getattr(args, "tensor_parallel", 1)
    if world_size <= 1:
        if tensor_parallel > 1:
            from utils.distributed.tensor_parallel import check_layout
            check_layout(tensor_parallel, world_size, args.n_head)
        return args
    from utils.io.errors import UserError
    if args.cli == "train":
        if args.multi_gpu == "dp":
            raise UserError(f"WORLD_SIZE={world_size} but --multi_gpu dp is a single-process mode; use --multi_gpu "
                            "ddp (or fsdp) with several processes, or start one process for dp")
        if args.multi_gpu is None:
            args = args.replace(multi_gpu="ddp")
    use_cuda = torch.cuda.is_available() and args.cuda is not False
    if use_cuda:
        local_rank = env_int("LOCAL_RANK", args.local_rank)
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    init_distributed(torch.device("cuda" if use_cuda else "cpu"),
                     args.dist_timeout)
    if tensor_parallel > 1:
        from utils.distributed.tensor_parallel import init_mesh
        init_mesh(tensor_parallel, args.n_head, "cuda" if use_cuda else "cpu")
    return args


def shutdown() -> None:
    if is_initialized():
        # every rank done with its collectives before any tears down: a gloo rank whose peer closed its
        # connections mid-teardown could die at exit ("terminate called without an active exception", SIGABRT)
        dist.barrier()
        dist.destroy_process_group()


def broadcast_object(obj):
    """rank 0's `obj` on every rank."""
    if not is_initialized():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def gather_dp_objects(obj) -> list | None:
    """Every data-parallel rank's `obj` as a list on rank 0, by data-parallel rank (the ranks of one
    tensor-parallel group hold the same data and memory: the group's first rank speaks for it)."""
    gathered = gather_objects(obj)
    return gathered[::tp_world_size()] if gathered is not None else None


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
    """The module the training step calls: DistributedDataParallel around `model` (--multi_gpu ddp), `model`
    itself sharded in place with FSDP2 (--multi_gpu fsdp, see utils/distributed/fsdp.py), or `model` in one process.

    DDP looks for unused parameters only when the model can have some: with adaptive softmax a batch may
    hold no token of a cluster, leaving that cluster's embedding and output weights without a gradient.
    """
    if tp_world_size() > 1:
        from utils.distributed.tensor_parallel import parallelize
        return parallelize(model, args)
    if not is_initialized() or get_world_size() == 1:
        return model
    if args.multi_gpu == "fsdp":
        from utils.distributed.fsdp import shard_model
        return shard_model(model, device)
    from torch.nn.parallel import DistributedDataParallel
    device_ids = [device.index] if device.type == "cuda" else None
    bucket = getattr(args, "ddp_bucket_cap_mb", None)
    ddp = DistributedDataParallel(model, device_ids=device_ids, **({"bucket_cap_mb": bucket} if bucket else {}),
                                  find_unused_parameters=bool(getattr(model, "cutoffs", True)))
    hook = getattr(args, "ddp_comm_hook", "none")
    rank_norms = getattr(args, "log_noise_scale", False) and args.batch_chunk == 1
    if hook != "none" or rank_norms:     # 16-bit all-reduce (half the traffic); each rank's gradient norm
        from utils.distributed import comm_hooks
        ddp.comm_hook_state = comm_hooks.register(ddp, hook)
    return ddp


def no_grad_sync(para_model: torch.nn.Module):
    """A context in which backward accumulates gradients locally without synchronizing them across ranks
    (all chunks of a batch but the last); a null context for a single process."""
    if hasattr(para_model, "no_sync"):
        return para_model.no_sync()
    if hasattr(para_model, "set_requires_gradient_sync"):
        return _fsdp_no_sync(para_model)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(model):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)
