"""One gradient buffer for a table used twice: the tied embedding / output-layer table (issue 18).

With tied weights the [n_token, d] table is looked up by the embedding and scored by the output layer. The
output layer (utils/model/adaptive_nll.py, `_SharedTableNLL`) already writes its gradient into one table-sized
buffer; the embedding's own backward would allocate a second, zero-filled, table-sized gradient for the few
hundred rows it touches, and autograd would then add the two tables. Here the lookup's backward adds its rows
into the output layer's buffer instead: no zero fill, no table-sized sum, one table-sized gradient in all.

The hand-over: the lookup's forward leaves a `TableGradSlot` for its table ;
the output layer's forward takes it (a map by the table's id), and its backward (which runs first: the lookup's output feeds the output
layer's input) puts its table gradient in the slot while returning it to autograd as usual. The lookup's
backward then adds its rows into that tensor, in place, and returns no gradient of its own. If the lookup's
backward does not find a buffer (no output layer in between, untied weights, compiled), it returns the
embedding's usual gradient.

Same bits as autograd's sum: the embedding's gradient row of a token is 0 + g_i1 + g_i2 + ... over its
occurrences in order, and autograd then adds it to the output layer's row once. Here each token's rows are
summed in the same order first (into its first occurrence's row of a [N, d] buffer: index_add_ goes through
the indices in order), and that sum is added to the output layer's row once (the other occurrences add +0.0,
which changes nothing but the sign of a zero). Nothing is read back to the host (static shapes).
"""
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor


class TableGradSlot:
    """Where the output layer's backward leaves its table gradient for the lookup's backward."""

    __slots__ = ("buffer",)

    def __init__(self):
        self.buffer: Optional[Tensor] = None


# id(table) -> the slot of its latest lookup, taken by the next output layer of that table (at most one entry per
# table; a stale entry after a table is freed only makes one backward return the output layer's gradient alone)
_SLOTS: Dict[int, TableGradSlot] = {}


def _usable(weight: Tensor) -> bool:
    # CPU only: on CUDA index_add_ adds with atomics in a varying order (not bit-reproducible), and a GPU's
    # zero fill is a cheap memset; there the embedding keeps its own gradient
    return (torch.is_grad_enabled() and weight.requires_grad and not torch.compiler.is_compiling()
            and weight.device.type == "cpu" and not hasattr(weight, "device_mesh")
            and weight.layout == torch.strided)


def lookup(weight: Tensor, tokens: Tensor) -> Tensor:
    """F.embedding(tokens, weight), whose weight gradient goes into the output layer's buffer when there is one."""
    if not _usable(weight):
        return F.embedding(tokens, weight)
    slot = TableGradSlot()
    _SLOTS[id(weight)] = slot
    return _TableLookup.apply(weight, tokens, slot)


def slot_for(table: Tensor) -> Optional[TableGradSlot]:
    """The slot of the latest lookup of `table`, taken (one output layer per lookup); None when there is none
    (the output layer's gradient then stands alone)."""
    if not _usable(table):
        return None
    return _SLOTS.pop(id(table), None)


def first_occurrence_sums(tokens: Tensor, grad: Tensor) -> Tensor:
    """[N, d]: row i holds the sum of grad's rows of every occurrence of tokens[i] (in order, from 0) when i is
    the token's first occurrence, and 0 elsewhere. tokens [N], grad [N, d]."""
    n = tokens.numel()
    order = torch.argsort(tokens, stable=True)                        # occurrences of a token in order
    ranked = tokens.index_select(0, order)
    positions = torch.arange(n, device=tokens.device)
    starts = torch.ones(n, dtype=torch.bool, device=tokens.device)
    starts[1:] = ranked[1:] != ranked[:-1]
    run_start = torch.cummax(torch.where(starts, positions, 0), 0).values
    first = torch.empty_like(order)
    first[order] = order.index_select(0, run_start)                   # position of the token's first occurrence
    return torch.zeros_like(grad).index_add_(0, first, grad)


class _TableLookup(torch.autograd.Function):

    @staticmethod
    def forward(ctx, weight: Tensor, tokens: Tensor, slot: TableGradSlot) -> Tensor:
        ctx.save_for_backward(tokens)
        ctx.slot = slot
        ctx.num_weights = weight.size(0)
        return F.embedding(tokens, weight)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (tokens,) = ctx.saved_tensors
        slot, ctx.slot = ctx.slot, None
        buffer = None if slot is None else slot.buffer
        if slot is not None:
            slot.buffer = None                  # autograd may then take the buffer as .grad without a copy
        if buffer is None:
            return torch.ops.aten.embedding_dense_backward(grad, tokens, ctx.num_weights, -1, False), None, None
        flat = tokens.reshape(-1)
        rows = grad.reshape(flat.numel(), -1).to(buffer.dtype)
        buffer.index_add_(0, flat, first_occurrence_sums(flat, rows))
        return None, None, None
