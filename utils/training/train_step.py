"""One optimizer step of Transformer-XL training, shared by train.py and scripts/benchmark_train.py.

    zero the gradients; for each of batch_chunk column chunks: forward (under autocast) with that chunk's
    memory, mean NLL / batch_chunk, backward (scaled with fp16); unscale, clip the gradient norm, step
    (skipped by the fp16 scaler when a gradient is not finite), update the scale.

The memory of each chunk is carried in `mems` (a list, updated in place). The loss and the gradient norm come
back to the host once per step.
"""
import contextlib
from typing import Callable, List, Optional, Tuple

import torch
from torch import Tensor

from utils.distributed import group as distributed
from utils.distributed.fsdp import scalar
from utils.distributed.tensor_parallel import clip_grad_norm_


class TrainStep:
    """`step(data, target, mems) -> (loss, grad_norm)`; `skipped_steps` counts the steps the fp16 loss scaler
    skipped since the caller last reset it."""

    def __init__(self, model: torch.nn.Module, forward_model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 scaler: torch.amp.GradScaler, autocast: Callable[[], contextlib.AbstractContextManager],
                 clip: float, batch_chunk: int = 1, swap_mem: bool = False, cuda_graphs: bool = False):
        self.model = model                      # the parameters (clipping)
        self.forward_model = forward_model      # what runs the forward: model, its DDP wrapper, compiled
        self.optimizer = optimizer
        self.scaler = scaler
        self.autocast = autocast
        self.clip = clip
        self.batch_chunk = batch_chunk
        self.swap_mem = swap_mem
        self.cuda_graphs = cuda_graphs
        self.skipped_steps = 0
        self.observer = None                    # e.g. a NoiseScaleMeter: after_backward(chunk), after_step(norm)

    def __call__(self, data: Tensor, target: Tensor, mems: List[Optional[Tensor]]) -> Tuple[float, float]:
        model, chunks = self.forward_model, self.batch_chunk
        self.optimizer.zero_grad(set_to_none=True)
        device = target.device
        step_loss = torch.zeros((), device=device)
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        for i, (data_i, target_i) in enumerate(zip(torch.chunk(data, chunks, 1), torch.chunk(target, chunks, 1))):
            # gradients are synchronized across ranks once per step, in the backward of the last chunk
            sync = distributed.no_grad_sync(model) if i < chunks - 1 else contextlib.nullcontext()
            with sync:
                mem = mems[i]
                if self.swap_mem and mem is not None:
                    mem = mem.to(device, non_blocking=True)
                with self.autocast():
                    loss, mem = model(data_i, target_i, mem)
                loss = loss.float().mean() / chunks
                self.scaler.scale(loss).backward()
                if self.observer is not None:
                    self.observer.after_backward(i)
                if mem is not None and self.cuda_graphs:
                    mem = mem.clone()           # a CUDA graph's output buffer is reused by its next replay
                if self.swap_mem and mem is not None:
                    mem = mem.to("cpu", non_blocking=True)
                mems[i] = mem
                step_loss += loss.detach()
        self.scaler.unscale_(self.optimizer)
        grad_norm = clip_grad_norm_(self.model.parameters(), self.clip)   # torch's, or for DTensors mixed with tensors
        if self.observer is not None:
            self.observer.after_step(grad_norm)
        scale_before = self.scaler.get_scale() if self.scaler.is_enabled() else None
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if scale_before is not None and self.scaler.get_scale() < scale_before:
            self.skipped_steps += 1
        return step_loss.item(), scalar(grad_norm)
