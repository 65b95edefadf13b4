"""DDP communication hooks: `--ddp_comm_hook fp16|bf16` and the per-rank gradient norms of `--log_noise_scale`.

fp16 / bf16: DDP all-reduces the gradient buckets cast to 16 bits (half the traffic), with PyTorch's own hooks
(torch.distributed.algorithms.ddp_comm_hooks.default_hooks): each rank divides its bucket by the world size,
casts it, all-reduces it and casts the sum back into the float32 bucket. DDP refuses its bf16 hook unless
NCCL >= 2.10 (or XCCL) is present, a check by the hook's name meant for old NCCL versions; gloo all-reduces
bfloat16 tensors, so the hook is called through a function of another name.

Rank norms: before a bucket is all-reduced it holds this rank's gradient (of its share of the batch), so the
hook adds the bucket's squared norm to `HookState.observer` (a NoiseScaleMeter) when one is set: the noise
scale's small-batch samples with --batch_chunk 1, on the device, no extra pass.
"""
import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

_HOOKS = {"none": default_hooks.allreduce_hook, "fp16": default_hooks.fp16_compress_hook,
          "bf16": default_hooks.bf16_compress_hook}


class HookState:
    """What the hook reads besides the bucket: the all-reduce to use and an optional gradient-norm observer."""

    def __init__(self, hook: str):
        if hook not in _HOOKS:
            raise ValueError(f"unknown DDP communication hook {hook!r}")
        self.all_reduce = _HOOKS[hook]
        self.observer = None


def _observe_and_reduce(state: HookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    if state.observer is not None:
        state.observer.add_rank_square(bucket.buffer().detach().double().pow(2).sum())
    return state.all_reduce(None, bucket)


def register(ddp_model, hook: str) -> HookState:
    """Register the all-reduce `hook` (none, fp16 or bf16) with an observer slot; returns its state."""
    state = HookState(hook)
    ddp_model.register_comm_hook(state, _observe_and_reduce)
    return state
