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
embedding's usual gradient. Under torch.compile the model runs the lookup outside the graph when its tied output
layer runs eagerly too (`embed_outside_the_graph`), so the hand-over still happens there.

Same bits as autograd's sum: the embedding's gradient row of a token is 0 + g_i1 + g_i2 + ... over its
occurrences in order, and autograd then adds it to the output layer's row once. Here each token's rows are
summed in the same order first (into its first occurrence's row of a [N, d] buffer: index_add_ goes through
the indices in order), and that sum is added to the output layer's row once (the other occurrences add +0.0,
which changes nothing but the sign of a zero). Nothing is read back to the host (static shapes).
"""
import sys
from typing import Dict, Iterable, Optional, Set, Tuple

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


# The table gradient's memory, kept from one step to the next on the CPU. A fresh table-sized tensor is fresh
# memory: glibc maps a request that large anew each time and returns it on free, so each step's first writes into
# the 274 MB WikiText-103 table gradient page-faulted ~67,000 times.
# (shape, dtype) -> last step's gradient, taken by the next backward that writes a whole table (every element).
_SPARES: Dict[Tuple[Tuple[int, ...], torch.dtype], Tensor] = {}
_WANTED: Set[Tuple[Tuple[int, ...], torch.dtype]] = set()        # the shapes such a backward has asked for


def table_gradient_buffer(like: Tensor) -> Tensor:
    """An uninitialized tensor of like's shape, dtype and device, for a backward that writes every element: the
    previous step's table gradient when `keep_for_reuse` kept it (CPU), else new memory."""
    if like.device.type == "cpu" and not torch.compiler.is_compiling():
        key = (tuple(like.shape), like.dtype)
        _WANTED.add(key)
        spare = _SPARES.pop(key, None)
        if spare is not None:
            return spare
    return torch.empty(like.shape, dtype=like.dtype, device=like.device)


def keep_for_reuse(params: Iterable[Tensor]) -> None:
    """Before the gradients are dropped (zero_grad(set_to_none=True)): keep the memory of a table gradient for
    the next backward. Only a gradient that nothing else holds (its own storage, not a view, not a DDP bucket,
    no other reference to the tensor) and whose shape a backward asked for (float32 training: under autocast
    the output layer's buffer is in the compute dtype and the float32 gradient a copy of it); the values are
    overwritten, so results do not change."""
    for p in params:
        g = p.grad
        if g is None or g.device.type != "cpu" or g.layout != torch.strided or hasattr(g, "device_mesh"):
            continue
        key = (tuple(g.shape), g.dtype)
        if key not in _WANTED or key in _SPARES or g._base is not None or not g.is_contiguous() \
                or g.storage_offset() != 0 or sys.getrefcount(g) > _grad_refcount() or not _sole_owner(g):
            continue
        _SPARES[key] = g


_GRAD_REFCOUNT: list = []


def _grad_refcount() -> int:
    """sys.getrefcount of `g = p.grad` when nothing else holds that tensor object (this Python's and this torch's
    count, measured once the same way keep_for_reuse measures): a larger count means someone kept the gradient
    itself (`kept = p.grad`, a hook), whose values must then survive."""
    if not _GRAD_REFCOUNT:
        p = torch.zeros(1, requires_grad=True)
        p.grad = torch.zeros(1)
        g = p.grad
        _GRAD_REFCOUNT.append(sys.getrefcount(g))
    return _GRAD_REFCOUNT[0]


def _sole_owner(t: Tensor) -> bool:
    """No other tensor shares t's memory (a view, a DDP bucket)."""
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    if use_count is None:
        return False
    storage = t.untyped_storage()
    return use_count(storage._cdata) == 2              # t and the handle `storage` itself


@torch.compiler.disable
def embed_outside_the_graph(embedding: torch.nn.Module, tokens: Tensor) -> Tensor:
    """embedding(tokens) run eagerly under torch.compile (a graph break): on the CPU, with a tied output layer
    that itself runs eagerly (the exact-size adaptive softmax), the lookup's gradient can then go into that
    layer's buffer as it does uncompiled. Inside the compiled graph the lookup's backward would zero-fill a
    table-sized gradient of its own and autograd would add the two tables: three passes over the WikiText-103
    table for a few hundred rows (benchmarks/results/training/cpu/issue18/step_time/profile_compiled_c101830.txt)."""
    return embedding(tokens)


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
