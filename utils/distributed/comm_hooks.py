"""`--ddp_comm_hook fp16|bf16`: DDP all-reduces the gradient buckets cast to 16 bits (half the traffic), with
PyTorch's own hooks (torch.distributed.algorithms.ddp_comm_hooks.default_hooks): each rank divides its bucket
by the world size, casts it, all-reduces it and casts the sum back into the float32 bucket.

DDP refuses its bf16 hook unless NCCL >= 2.10 (or XCCL) is present, a check by the hook's name meant for old
NCCL versions; gloo all-reduces bfloat16 tensors, so on other backends the same hook is registered under
another name.
"""
import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks


def _bf16_compress(process_group: dist.ProcessGroup, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    return default_hooks.bf16_compress_hook(process_group, bucket)


def register(ddp_model, hook: str) -> None:
    """Register the gradient compression `hook` (fp16 or bf16) on a DistributedDataParallel model."""
    if hook == "fp16":
        ddp_model.register_comm_hook(None, default_hooks.fp16_compress_hook)
    elif hook == "bf16":
        nccl = dist.get_backend() == "nccl"
        ddp_model.register_comm_hook(None, default_hooks.bf16_compress_hook if nccl else _bf16_compress)
    else:
        raise ValueError(f"unknown DDP communication hook {hook!r}")
