"""One optimizer step of Transformer-XL training, shared by train.py and scripts/benchmark_train.py.

    zero the gradients; for each of batch_chunk column chunks: forward (under autocast) with that chunk's
    memory, mean NLL / batch_chunk, backward (scaled with fp16); unscale, clip the gradient norm, step
    (skipped by the fp16 scaler when a gradient is not finite), update the scale.

The memory of each chunk is carried in `mems` (a list, updated in place). `run` returns the loss and the gradient
norm as device tensors and reads nothing back to the host (issue 18: the loop reads them at log intervals,
utils/training/step_metrics.py); calling the step returns them as Python floats (one read-back).
"""
import contextlib
from typing import Callable, List, Optional, Tuple

import torch
from torch import Tensor

from utils.distributed import group as distributed
from utils.distributed.fsdp import is_sharded, scalar
from utils.distributed.tensor_parallel import clip_grad_norm_
from utils.model import shared_table_grad
from utils.training.compute_weights import ComputeWeights
from utils.training.lamb import Lamb
from utils.training.unused_clusters import UnusedClusterGuard


class TrainStep:
    """`step(data, target, mems) -> (loss, grad_norm)` as floats, `step.run(...)` as device tensors;
    `skipped_steps` counts the steps the fp16 loss scaler skipped since the caller last reset it (kept on the
    device; reading it is a read-back)."""

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
        self._skipped: Optional[Tensor] = None  # device counter of skipped fp16 steps (None: zero)
        self.observer = None                    # e.g. a NoiseScaleMeter: after_backward(chunk), after_step(norm)
        # fused LAMB clips in its own multi-tensor pass (issue 18); sharded (FSDP) or tensor-parallel (DTensor)
        # parameters keep clip_grad_norm_ (utils/distributed/tensor_parallel.py)
        self.clip_in_optimizer = isinstance(optimizer, Lamb) and optimizer.defaults["fused"] \
            and not is_sharded(model) and not any(hasattr(p, "full_tensor") for p in model.parameters())
        # bf16: weights kept in bf16 for the step instead of autocast's per-weight casts (compute_weights.py)
        self.compute_weights = ComputeWeights.for_step(model, forward_model, autocast)
        # div_val > 1: tail clusters absent from a batch keep their parameters, as in the reference
        self.cluster_guard = UnusedClusterGuard(model)

    @property
    def skipped_steps(self) -> int:
        return 0 if self._skipped is None else int(self._skipped)

    @skipped_steps.setter
    def skipped_steps(self, value: int) -> None:
        self._skipped = None if value == 0 else torch.tensor(value)

    def __call__(self, data: Tensor, target: Tensor, mems: List[Optional[Tensor]]) -> Tuple[float, float]:
        loss, grad_norm = self.run(data, target, mems)
        return loss.item(), scalar(grad_norm)

    def run(self, data: Tensor, target: Tensor, mems: List[Optional[Tensor]]) -> Tuple[Tensor, Tensor]:
        """One optimizer step; (loss, gradient norm) as 0-dim device tensors, nothing read back to the host."""
        model, chunks = self.forward_model, self.batch_chunk
        shared_table_grad.keep_for_reuse(self.model.parameters())     # the table gradient's memory (CPU)
        self.optimizer.zero_grad(set_to_none=True)
        device = target.device
        step_loss = torch.zeros((), device=device)
        used_clusters = self.cluster_guard.usage(data, target) if self.cluster_guard.active else None
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        for i, (data_i, target_i) in enumerate(zip(torch.chunk(data, chunks, 1), torch.chunk(target, chunks, 1))):
            # gradients are synchronized across ranks once per step, in the backward of the last chunk
            sync = distributed.no_grad_sync(model) if i < chunks - 1 else contextlib.nullcontext()
            weights = self.compute_weights.swapped(refresh=i == 0) if self.compute_weights is not None \
                else contextlib.nullcontext()
            with sync, weights:
                mem = mems[i]
                if self.swap_mem and mem is not None:
                    mem = mem.to(device, non_blocking=True)
                with self.autocast():
                    loss, mem = model(data_i, target_i, mem)
                loss = loss.float().mean() / chunks
                self.scaler.scale(loss).backward()
                if self.compute_weights is not None:
                    self.compute_weights.collect_grads()
                if self.observer is not None:
                    self.observer.after_backward(i)
                if mem is not None and self.cuda_graphs:
                    mem = mem.clone()           # a CUDA graph's output buffer is reused by its next replay
                if self.swap_mem and mem is not None:
                    mem = mem.to("cpu", non_blocking=True)
                mems[i] = mem
                step_loss += loss.detach()
        self.scaler.unscale_(self.optimizer)
        if self.clip_in_optimizer:
            # clip_grad_norm_'s math; the multiply by the factor happens inside LAMB's update (one pass less)
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            grad_norm = torch.nn.utils.get_total_norm(grads, 2.0, error_if_nonfinite=False, foreach=None)
            self.optimizer.clip_coef = torch.clamp(self.clip / (grad_norm + 1e-6), max=1.0)
        else:
            grad_norm = clip_grad_norm_(self.model.parameters(), self.clip)   # torch's, or for DTensors mixed with tensors
        if self.observer is not None:
            self.observer.after_step(grad_norm)                           # the norm before clipping
        # fp16: the scaler lowers its scale exactly when it skips a step; compared on the device (the scale
        # tensor `_scale`, not get_scale(), which reads it back). The optimizer step itself reads nothing back
        # when the optimizer handles the scaler's found_inf on the device (Lamb: `_step_supports_amp_scaling`).
        scale_before = self.scaler._scale.clone() if self.scaler.is_enabled() else None
        if used_clusters is not None:
            self.cluster_guard.snapshot(self.optimizer)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if used_clusters is not None:
            self.cluster_guard.restore(self.optimizer, used_clusters)
        if scale_before is not None:
            lowered = (self.scaler._scale < scale_before).to(torch.int64)
            self._skipped = lowered if self._skipped is None else self._skipped.to(lowered.device) + lowered
        return step_loss, grad_norm
