"""Perplexity evaluation over a batch stream, shared by train.py (periodic eval, final test) and eval.py."""
import contextlib
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch

from utils.distributed import group as distributed
from utils.io.errors import UserError


def eval_lengths(tgt_len: int, ext_len: int, mem_len: int, eval_tgt_len: int) -> tuple[int, int, int]:
    """(tgt_len, ext_len, mem_len) for evaluation with segments of `eval_tgt_len`, keeping the context size.

    As the reference: with memory, mem_len grows by what the segment shrinks (mem_len + tgt_len -
    eval_tgt_len); without memory (mem_len 0) the extended context grows instead.
    """
    if mem_len == 0:
        return eval_tgt_len, ext_len + tgt_len - eval_tgt_len, 0
    return eval_tgt_len, ext_len, mem_len + tgt_len - eval_tgt_len


@dataclass
class EvalResult:
    total_loss: float = 0.0      # sum over scored tokens of the NLL (nats)
    total_len: int = 0           # scored positions per stream (segment lengths of warm batches)
    n_batches: int = 0           # all batches run, warm-up included

    @property
    def loss(self) -> float:
        if self.total_len == 0:
            raise UserError("nothing was evaluated: every batch was a memory warm-up batch or the split is too "
                            "short; raise --eval_max_steps / --max_size or use a longer split")
        return self.total_loss / self.total_len


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def evaluate_stream(model: torch.nn.Module, batches: Iterable, device: torch.device,
                    max_steps: int = -1, autocast: Optional[Callable[[], contextlib.AbstractContextManager]] = None,
                    timed: bool = False, on_batch: Optional[Callable[[int, float, float, int], None]] = None,
                    mems: Optional[torch.Tensor] = None) -> EvalResult:
    """Run `model` over `batches` of (data, target, seq_len, warm), carrying the memory.

    The mean NLL of a batch counts `seq_len` times, and only for warm batches (the first batches of an
    evaluation stream only prime the memory). `on_batch(index, seconds, mean_loss, n_tokens)` is called after
    each batch; `timed` synchronizes the device around each forward, so that `seconds` is the batch's latency.
    """
    result = EvalResult()
    autocast = autocast or contextlib.nullcontext
    for index, (data, target, seq_len, warm) in enumerate(batches):
        if 0 <= max_steps <= index:
            break
        if timed:
            _sync(device)
        start = time.perf_counter()
        with autocast():
            loss, mems = model(data, target, mems)
        loss = loss.float().mean()
        if timed:
            _sync(device)
        elapsed = time.perf_counter() - start
        loss_value = loss.item()
        if warm:
            result.total_loss += seq_len * loss_value
            result.total_len += seq_len
        result.n_batches += 1
        if on_batch is not None:
            on_batch(index, elapsed, loss_value, target.numel())
    return result


def reduce_eval_result(result: EvalResult, iterator) -> tuple[float, float]:
    """(sum of NLL, number of scored tokens) over all ranks, each rank having scored its columns of the
    batch (`iterator.col_first:col_last`). A rank's mean NLL per batch counts once per column it scored, so
    the result is the loss over the whole batch even when the ranks hold different numbers of columns."""
    n_columns = getattr(iterator, "col_last", 1) - getattr(iterator, "col_first", 0)
    total = distributed.all_reduce_item(result.total_loss * n_columns, "sum")
    count = distributed.all_reduce_item(result.total_len * n_columns, "sum")
    return total, count
