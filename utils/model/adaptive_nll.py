"""The adaptive-softmax NLL without data-dependent shapes or host reads, and with one gradient buffer for a
vocabulary table shared by all clusters (issue 18).

Layout of the tokens (static shapes): every token's cluster id, one stable sort by it, and the cluster sizes
counted by a comparison with [0 .. K] (no bincount, whose output size depends on the data). Tail cluster i's
tokens are the sorted positions [start_i, start_i + count_i). They are gathered with a fixed capacity C_i:
positions start_i + [0, C_i), rows past count_i masked (their NLL and gradient are zero).

    capacity None    exact sizes: the counts are read back to the host once per call (eager only)
    capacity f       C_i = ceil(f * N) rows per tail cluster, whatever the batch: shapes never change, nothing is
                     read back, one compiled graph. f = 1 is exact for every batch (and costs a tail cluster's
                     logits for all N tokens); a smaller f is cheaper and exact while no tail cluster holds more
                     than f * N of the batch's tokens. Tokens past the capacity get a NaN NLL, so an overflow
                     never passes silently (the training loop stops on a non-finite loss at its next check).

The logits are computed in the matmul's dtype (bf16 under autocast) and their log-sum-exp in float32, in row
blocks (utils/model/linear_nll.py): no float32 copy of a whole logits tensor.

Shared table (div_val 1: every cluster's output rows are a row block of one [n_token, d] table, the embedding
when tied): autograd would give every block's gradient as a full-size zero-filled tensor and sum them (one per
cluster); here one autograd function scores all clusters and writes each block's gradient into ONE table-sized
buffer (every row is written once: no zero fill).
"""
from fractions import Fraction
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from utils.model.shared_table_grad import TableGradSlot, slot_for, table_gradient_buffer
from utils.model.linear_nll import (_compute_dtype, grouped_grad_logits_, grouped_lse, linear_logits,
                                    linear_logits_into, linear_nll, logits_grad_input, nll_grad_logits_,
                                    onednn_applies, row_lse)


# ---- token layout -----------------------------------------------------------------------------------------
def cluster_ids(target: Tensor, cutoffs: List[int]) -> Tensor:
    """0 for shortlist tokens, i for tokens of tail cluster i."""
    cluster = torch.zeros_like(target)
    for c in cutoffs:
        cluster = cluster + (target >= c)                                # int64 + bool: no cast op
    return cluster


def tail_gathers(target: Tensor, cutoffs: List[int], capacity: Optional[float]
                 ) -> Tuple[Tensor, List[Tuple[Tensor, Tensor]]]:
    """(cluster ids [N], per tail cluster (positions [C_i], valid [C_i] bool)); see the module docstring."""
    n, k = target.size(0), len(cutoffs)
    cluster = cluster_ids(target, cutoffs)
    order = torch.argsort(cluster, stable=True)
    counts = (cluster.unsqueeze(1) == torch.arange(k + 1, device=target.device)).sum(0)     # [K+1]
    starts = torch.cumsum(counts, 0) - counts
    out: List[Tuple[Tensor, Tensor]] = []
    if capacity is None:                                                       # exact sizes: one read-back
        sizes = counts.tolist()
        for i in range(1, k + 1):
            begin = sum(sizes[:i])
            idx = order[begin:begin + sizes[i]]
            out.append((idx, torch.ones_like(idx, dtype=torch.bool)))
        return cluster, out
    # ceil(capacity * n) in integer arithmetic (n may be a symbolic size under dynamic-shape compilation)
    frac = Fraction(capacity).limit_denominator(1 << 16)
    cap = n if frac >= 1 else (n * frac.numerator + frac.denominator - 1) // frac.denominator
    rows = torch.arange(cap, device=target.device)
    for i in range(1, k + 1):
        valid = rows < counts[i]
        idx = order[(starts[i] + rows).clamp(max=n - 1)]
        out.append((idx, valid))
    return cluster, out


def overflow_nan(cluster: Tensor, gathers: List[Tuple[Tensor, Tensor]], like: Tensor) -> Optional[Tensor]:
    """[N]: NaN for the tail tokens that did not fit their cluster's capacity, 0 elsewhere; None when the
    capacity is N (nothing can overflow)."""
    if all(valid.numel() >= cluster.numel() for _, valid in gathers):
        return None
    scored = (cluster == 0).to(like.dtype)
    for idx, valid in gathers:                      # a tail token is gathered as valid at most once
        scored = scored.index_add(0, idx, valid.to(like.dtype))
    return torch.where(scored > 0, 0.0, float("nan")).to(like.dtype)


# ---- generic clusters (div_val > 1: own tables) -----------------------------------------------------------
def _project(hidden: Tensor, proj: Optional[Tensor]) -> Tensor:
    return hidden if proj is None else torch.matmul(hidden, proj)


def adaptive_nll(hidden: Tensor, target: Tensor, weights: List[Tensor], biases: List[Tensor],
                 projs: List[Optional[Tensor]], cutoffs: List[int], head_size: int,
                 capacity: Optional[float], compute: Optional[List[Tensor]] = None) -> Tensor:
    """NLL [N] under the adaptive softmax with the clusters' parameters (ProjectedAdaptiveLogSoftmax.cluster_params);
    compute: [weight, bias] already in the matmul dtype (no clusters only; see linear_nll)."""
    if not cutoffs:
        w_c, b_c = (compute[0], compute[1]) if compute is not None else (None, None)
        return linear_nll(_project(hidden, projs[0]), weights[0], biases[0], target, w_c, b_c)
    bounds = [0] + list(cutoffs)
    cluster, gathers = tail_gathers(target, cutoffs, capacity)
    head_col = torch.where(cluster == 0, target, head_size - cluster)
    nll = linear_nll(_project(hidden, projs[0]), weights[0], biases[0], head_col)
    for i, (idx, valid) in enumerate(gathers, start=1):
        local = torch.where(valid, target.index_select(0, idx) - bounds[i], 0)
        tail = linear_nll(_project(hidden.index_select(0, idx), projs[i]), weights[i], biases[i], local)
        nll = nll.index_add(0, idx, torch.where(valid, tail, 0.0))
    bad = overflow_nan(cluster, gathers, nll) if capacity is not None else None
    return nll if bad is None else nll + bad


# ---- one shared table (div_val 1) -------------------------------------------------------------------------
class _SharedTableNLL(torch.autograd.Function):
    """NLL of every cluster whose output rows are row blocks [bounds[i], bounds[i+1]) of one table; the head
    also scores the extra cluster rows (cluster_weight / cluster_bias). Inputs per cluster: projected hidden
    h_i [n_i, d] and local targets t_i [n_i]; outputs: nll_i [n_i] (float32). `compute`: table, bias, extra_w,
    extra_b already in the matmul dtype (a bf16 step's compute copies, utils/training/compute_weights.py), or
    None: the parameters are cast here."""

    @staticmethod
    def forward(ctx, table: Tensor, bias: Tensor, extra_w: Tensor, extra_b: Tensor, bounds: Tuple[int, ...],
                slot: Optional[TableGradSlot], compute: Optional[List[Tensor]], *inputs: Tensor):
        hs, ts = inputs[0::2], inputs[1::2]
        dtype = _compute_dtype(hs[0])
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        outs, saved, logits_list = [], [], []
        with torch.autocast(table.device.type, enabled=False):
            if compute is not None and compute[0].dtype == dtype:
                w_all, b_all, extra_w_c, extra_b_c = compute
            else:
                w_all, b_all, extra_w_c, extra_b_c = table.to(dtype), bias.to(dtype), extra_w.to(dtype), extra_b.to(dtype)
            # every cluster's logits in one buffer, one after the other: their float32 log-sum-exp (and the
            # backward's float32 softmax) convert them group by group, not cluster by cluster. Not under
            # torch.compile: there each write into a slice of a shared buffer becomes a copy of the whole buffer
            # (slice_scatter: several times the time and memory of this loss), and inductor fuses the
            # per-cluster conversions anyway, so each cluster gets its own tensor.
            # Nor where oneDNN computes float32 logits (linear_logits: it writes new tensors; float32 needs no
            # conversion anyway).
            separate = torch.compiler.is_compiling() or onednn_applies(table.device, dtype)
            sizes = [h.size(0) * (bounds[i + 1] - bounds[i] + (extra_w.size(0) if i == 0 else 0))
                     for i, h in enumerate(hs)]
            buffer = None if separate else torch.empty(sum(sizes), dtype=dtype, device=table.device)
            start = 0
            hs_c, ws = [], []
            for i, (h, t) in enumerate(zip(hs, ts)):
                lo, hi = bounds[i], bounds[i + 1]
                w, b = w_all[lo:hi], b_all[lo:hi]
                if i == 0:                                                      # shortlist rows ++ cluster rows
                    w = torch.cat([w, extra_w_c], 0)
                    b = torch.cat([b, extra_b_c], 0)
                h = h.to(dtype)
                logits_list.append(linear_logits(h, w, b) if buffer is None
                                   else linear_logits_into(buffer[start:start + sizes[i]], h, w, b))
                start += sizes[i]
                hs_c.append(h)
                ws.append(w)
            if separate and torch.compiler.is_compiling():    # whole tensors: no cache-sized blocks in a graph
                lses = [torch.logsumexp(z.to(acc), dim=1) for z in logits_list]
            elif buffer is None:                                    # oneDNN's float32 logits
                lses = [row_lse(z, acc) for z in logits_list]
            else:
                lses = grouped_lse(buffer, logits_list, acc)
            for i, (h, t) in enumerate(zip(hs_c, ts)):
                # the sub promotes to acc
                outs.append(lses[i] - logits_list[i].gather(1, t.unsqueeze(1)).squeeze(1))
                saved += [h, ws[i] if i == 0 else ws[0].new_empty(0), lses[i], t]
        ctx.save_for_backward(w_all, *saved)
        ctx.logits = logits_list
        ctx.buffer = buffer
        ctx.bounds = bounds
        ctx.slot = slot                         # the tied embedding adds its rows into our table gradient
        ctx.dtypes = (table.dtype, bias.dtype, extra_w.dtype, extra_b.dtype, [h.dtype for h in hs])
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grad_nlls: Tensor):
        w_all, *saved = ctx.saved_tensors
        logits_list = ctx.logits
        if logits_list is None:
            raise RuntimeError("the adaptive-softmax loss can be differentiated once per forward")
        ctx.logits = None
        buffer, ctx.buffer = ctx.buffer, None
        bounds = ctx.bounds
        table_dtype, bias_dtype, extra_w_dtype, extra_b_dtype, h_dtypes = ctx.dtypes
        k1 = len(grad_nlls)
        n_short = bounds[1]
        acc = torch.float64 if w_all.dtype == torch.float64 else torch.float32
        with torch.autocast(w_all.device.type, enabled=False):
            # ONE table-sized gradient; every row block is written below, so no zero fill is needed
            grad_table = table_gradient_buffer(w_all)
            grad_bias = torch.empty(w_all.size(0), dtype=acc, device=w_all.device)
            grad_extra_w = grad_extra_b = None
            grad_hs = []
            if buffer is None:                                                 # compiled: one tensor each
                for z, lse, t, g in zip(logits_list, saved[2::4], saved[3::4], grad_nlls):
                    nll_grad_logits_(z, lse, t, g)
            else:
                grouped_grad_logits_(buffer, logits_list, list(saved[2::4]), list(saved[3::4]), list(grad_nlls))
            for i in range(k1):
                h, w_head, lse, t = saved[4 * i: 4 * i + 4]
                lo, hi = bounds[i], bounds[i + 1]
                w = w_head if i == 0 else w_all[lo:hi]
                grad = logits_list[i]                                          # [n_i, V_i], in place of the logits
                grad_hs.append(logits_grad_input(grad, w).to(h_dtypes[i]))
                if i == 0:
                    torch.mm(grad[:, :n_short].t(), h, out=grad_table[:n_short])
                    torch.sum(grad[:, :n_short], 0, dtype=acc, out=grad_bias[:n_short])
                    grad_extra_w = torch.mm(grad[:, n_short:].t(), h).to(extra_w_dtype)
                    grad_extra_b = grad[:, n_short:].sum(0, dtype=acc).to(extra_b_dtype)
                else:
                    torch.mm(grad.t(), h, out=grad_table[lo:hi])
                    torch.sum(grad, 0, dtype=acc, out=grad_bias[lo:hi])
        grads_inputs = []
        for g in grad_hs:
            grads_inputs += [g, None]
        grad_table = grad_table.to(table_dtype)
        slot, ctx.slot = ctx.slot, None
        if slot is not None:
            slot.buffer = grad_table
        return (grad_table, grad_bias.to(bias_dtype), grad_extra_w, grad_extra_b, None, None, None, *grads_inputs)


def shared_table_adaptive_nll(hidden: Tensor, target: Tensor, table: Tensor, bias: Tensor, extra_w: Tensor,
                              extra_b: Tensor, projs: List[Optional[Tensor]], cutoffs: List[int],
                              capacity: Optional[float], compute: Optional[List[Tensor]] = None) -> Tensor:
    """NLL [N] of the adaptive softmax whose cluster weights are row blocks of `table` (div_val 1); compute:
    [table, bias, extra_w, extra_b] already in the matmul dtype, or None (see _SharedTableNLL)."""
    n_token = table.size(0)
    bounds = tuple([0] + list(cutoffs) + [n_token])
    head_size = cutoffs[0] + len(cutoffs)
    cluster, gathers = tail_gathers(target, cutoffs, capacity)
    head_col = torch.where(cluster == 0, target, head_size - cluster)
    inputs = [_project(hidden, projs[0]), head_col]
    for i, (idx, valid) in enumerate(gathers, start=1):
        inputs += [_project(hidden.index_select(0, idx), projs[i]),
                   torch.where(valid, target.index_select(0, idx) - bounds[i], 0)]
    outs = _SharedTableNLL.apply(table, bias, extra_w, extra_b, bounds, slot_for(table), compute, *inputs)
    nll = outs[0]
    for (idx, valid), tail in zip(gathers, outs[1:]):
        nll = nll.index_add(0, idx, torch.where(valid, tail, 0.0))
    bad = overflow_nan(cluster, gathers, nll) if capacity is not None else None
    return nll if bad is None else nll + bad
