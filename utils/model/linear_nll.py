"""Per-token NLL of a linear output layer, `nll[n] = logsumexp(z[n]) - z[n, target[n]]` with z = h·Wᵀ + b,
computed with one [N, V] buffer for forward and backward together.

The output layer is the largest tensor of a language model's step ([tokens, vocabulary]). Autograd's
`F.cross_entropy(F.linear(h, W, b), t)` keeps the logits, a log-softmax copy, a zero-filled gradient of the
same size and the gradient of the logits: four [N, V] buffers and as many full passes over memory. Here:

    forward   z = h·Wᵀ + b (the matmul's own dtype: float32, or bf16/fp16 under autocast),
              lse = logsumexp(z) in float32, in row blocks small enough for the cache; z is kept
    backward  z <- softmax(z) * g, minus g at the target (in place, in row blocks), then
              dh = dz·W, dW = dzᵀ·h, db = Σ dz

The log-sum-exp and the softmax are float32 whatever the matmul dtype (the logits of a bf16 matmul are only
rounded once, as they are with autocast's own cross-entropy). The saved logits are reused in place by the
backward, so the graph can be run backward once (a second backward raises a clear error).
"""
import math
import platform
from typing import List, Optional

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

# Elements per row block of the float32 passes: ~1 MB on the CPU (stays in cache), 64 MB on a GPU (bounds
# the float32 temporaries of a half-precision logits buffer).
_BLOCK_ELEMENTS = {"cpu": 1 << 22, "default": 1 << 24}


# linear_logits: fewer than V / _FEW_ROWS rows go through the [V, d]·[d, N] matmul on the CPU (BLAS path)
_FEW_ROWS = 64


def _probe_onednn() -> bool:
    """Whether this process can use oneDNN's float32 linear: an x86-64 CPU (where it was measured faster than the
    BLAS; elsewhere the BLAS stays), a build with the kernel, and right results for the layouts used below
    (a transposed input, a transposed weight)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        op = torch.ops.mkldnn._linear_pointwise
        # its own generator: the probe must not move the global one (dropout masks, exact resume)
        gen = torch.Generator().manual_seed(0)
        x, w, b = torch.randn(3, 8, generator=gen), torch.randn(5, 8, generator=gen), torch.randn(5, generator=gen)
        close = dict(rtol=1e-5, atol=1e-5)
        return (torch.backends.mkldnn.is_available()
                and torch.allclose(op(x, w, b, "none", [], ""), torch.addmm(b, x, w.t()), **close)
                and torch.allclose(op(x.t().contiguous().t(), w, None, "none", [], ""), x @ w.t(), **close)
                and torch.allclose(op(x.t().contiguous(), x.t(), None, "none", [], ""), x.t() @ x, **close))
    except (AttributeError, RuntimeError):
        return False


# Whether the float32 CPU matmuls of the output layer use oneDNN (onednn_applies). Probed once, here, at import:
# a probe run the first time a loss is traced by torch.compile would break its graph.
_ONEDNN: Optional[bool] = _probe_onednn()


def onednn_applies(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the output layer's matmuls on `device` in `dtype` (float32 on the CPU) go through oneDNN
    (`onednn_linear`) instead of the BLAS's sgemm.

    The output layer multiplies a few to a few hundred rows by a 20k-160k-row table. The BLAS's sgemm runs
    such skinny shapes well below its large-matrix speed; measured on one machine only, an AVX-512 AMD EPYC
    with MKL 2024 (benchmarks/results/training/cpu/issue18/output_layer_onednn.txt): the output layer of
    issue 18's step-time configuration, forward and backward, 202 ms with sgemm, 166 ms with oneDNN
    (`python scripts/benchmark_output_layer.py` measures both on any machine). Both are float32 with float32
    accumulation (other summation orders: last-bit differences). float64 and the half-precision dtypes keep
    their own paths (oneDNN already serves bf16 on the CPU)."""
    global _ONEDNN
    if device.type != "cpu" or dtype != torch.float32:
        return False
    if _ONEDNN is None:                         # (tests reset it to probe again)
        _ONEDNN = _probe_onednn()
    return _ONEDNN


@torch.library.custom_op("txl::onednn_linear", mutates_args=())
def onednn_linear(x: Tensor, w: Tensor, b: Optional[Tensor]) -> Tensor:
    """x [N, d] · w [V, d]ᵀ + b [V] by oneDNN (`torch.ops.mkldnn._linear_pointwise`, the kernel inductor
    itself uses for CPU linears; w may be a transposed view). An opaque op to torch.compile: inductor has no
    lowering of that kernel for a weight that is not a constant, and calls it as it is."""
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


@onednn_linear.register_fake
def _onednn_linear_fake(x: Tensor, w: Tensor, b: Optional[Tensor]) -> Tensor:
    return x.new_empty(x.shape[:-1] + (w.size(0),))


@register_flop_formula(torch.ops.txl.onednn_linear)
def _onednn_linear_flops(x_shape, w_shape, *args, **kwargs) -> int:
    """For torch.utils.flop_counter.FlopCounterMode (tests/test_flops.py counts a step's matmuls with it)."""
    return 2 * math.prod(x_shape[:-1]) * x_shape[-1] * w_shape[0]


def linear_logits(h: Tensor, w: Tensor, b: Optional[Tensor]) -> Tensor:
    """z = h·wᵀ + b [N, V] in a new tensor, for h [N, d], w [V, d], b [V] or None in the compute dtype."""
    if onednn_applies(h.device, h.dtype):
        return onednn_linear(h, w, b)
    return linear_logits_into(h.new_empty(h.size(0) * w.size(0)), h, w, b)


def logits_grad_input(grad: Tensor, w: Tensor) -> Tensor:
    """grad [N, V] · w [V, d] -> [N, d]: the gradient of the output layer's input (oneDNN where linear_logits
    used it: then grad is contiguous, the in-place gradient of those logits)."""
    if grad.is_contiguous() and onednn_applies(grad.device, grad.dtype):
        return onednn_linear(grad, w.t(), None)
    return torch.mm(grad, w)


def _row_blocks(n_rows: int, n_cols: int, device: torch.device) -> int:
    budget = _BLOCK_ELEMENTS.get(device.type, _BLOCK_ELEMENTS["default"])
    return max(1, min(n_rows, budget // max(1, n_cols)))


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype autocast would run a matmul of x in (x's own dtype when autocast is off)."""
    device_type = x.device.type
    if x.dtype in (torch.float32, torch.float16, torch.bfloat16) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def nll_forward(h: Tensor, w: Tensor, b: Optional[Tensor], target: Tensor):
    """(nll, logits, lse) of h [N, d], w [V, d], b [V] already in the compute dtype (autocast off)."""
    logits = linear_logits(h, w, b)
    lse = row_lse(logits, torch.float64 if h.dtype == torch.float64 else torch.float32)
    nll = lse - logits.gather(1, target.unsqueeze(1)).squeeze(1)                   # the sub promotes to acc
    return nll, logits, lse


def row_lse(logits: Tensor, acc: torch.dtype) -> Tensor:
    """logsumexp of each row of logits [N, V] in acc (float32 or float64), in row blocks that fit the cache."""
    lse = torch.empty(logits.size(0), dtype=acc, device=logits.device)
    step = _row_blocks(logits.size(0), logits.size(1), logits.device)
    for start in range(0, logits.size(0), step):
        torch.logsumexp(logits[start:start + step].to(acc), dim=1, out=lse[start:start + step])
    return lse


def linear_logits_into(buffer: Tensor, h: Tensor, w: Tensor, b: Optional[Tensor]) -> Tensor:
    """z = h·wᵀ + b [N, V] by the BLAS, written into `buffer`, N·V contiguous elements of the compute dtype."""
    n, v = h.size(0), w.size(0)
    if h.device.type == "cpu" and n * _FEW_ROWS < v:
        # a few rows against many (an adaptive-softmax tail cluster: a handful of tokens against up to 160k
        # vocabulary rows): with the BLAS, [V, d]·[d, N] is several times faster on the CPU than [N, d]·[d, V]
        # (its small-M path); the logits are the transposed view of that [V, N] buffer, which the backward's
        # table-gradient matmul then reads contiguously. Another summation order than F.linear's.
        out = buffer.view(v, n)
        torch.mm(w, h.t(), out=out) if b is None else torch.addmm(b.unsqueeze(1), w, h.t(), out=out)
        return out.t()
    out = buffer.view(n, v)
    torch.mm(h, w.t(), out=out) if b is None else torch.addmm(b, h, w.t(), out=out)
    return out


def _float_groups(sizes: List[int], device: torch.device) -> List[List[int]]:
    """Consecutive logits tensors (by their sizes) taken together into one float32 block: as many as fit the row
    block budget; one larger than the budget is a group of its own (its rows go in blocks)."""
    budget = _BLOCK_ELEMENTS.get(device.type, _BLOCK_ELEMENTS["default"])
    groups: List[List[int]] = []
    total = 0
    for i, size in enumerate(sizes):
        if not groups or total + size > budget:
            groups.append([])
            total = 0
        groups[-1].append(i)
        total += size
    return groups


def _same_layout(block: Tensor, logits: Tensor) -> Tensor:
    """block (logits.numel() contiguous elements) viewed with the layout of logits ([N, V], or [V, N] transposed)."""
    if logits.dim() == 2 and logits.size(0) > 1 and logits.stride(0) == 1:
        return block.view(logits.size(1), logits.size(0)).t()
    return block.view(logits.shape)


def grouped_lse(buffer: Tensor, logits_list: List[Tensor], acc: torch.dtype) -> List[Tensor]:
    """The float32 (acc) log-sum-exp of each row of several logits tensors that lie one after the other in
    `buffer` (linear_logits_into): ONE conversion to float32 per group that fits a row block (per cluster
    otherwise, nll_forward's row blocks), not one per tensor."""
    lses = [torch.empty(z.size(0), dtype=acc, device=z.device) for z in logits_list]
    sizes = [z.numel() for z in logits_list]
    start = 0
    for group in _float_groups(sizes, buffer.device):
        end = start + sum(sizes[i] for i in group)
        if len(group) == 1:                                              # row blocks of one tensor
            lses[group[0]] = row_lse(logits_list[group[0]], acc)
        else:
            block, at = buffer[start:end].to(acc), 0
            for i in group:
                if sizes[i]:                                             # (a tail cluster without tokens: nothing)
                    torch.logsumexp(_same_layout(block[at:at + sizes[i]], logits_list[i]), dim=1, out=lses[i])
                at += sizes[i]
        start = end
    return lses


def grouped_grad_logits_(buffer: Tensor, logits_list: List[Tensor], lses: List[Tensor], targets: List[Tensor],
                         grad_nlls: List[Tensor]) -> None:
    """nll_grad_logits_ of each logits tensor of `buffer` (grouped_lse's layout), in place: one conversion to
    float32 and one back per group."""
    sizes = [z.numel() for z in logits_list]
    start = 0
    for group in _float_groups(sizes, buffer.device):
        end = start + sum(sizes[i] for i in group)
        if len(group) == 1:
            i = group[0]
            nll_grad_logits_(logits_list[i], lses[i], targets[i], grad_nlls[i])
        else:
            block = buffer[start:end]
            p_all, at = block.to(lses[group[0]].dtype), 0
            for i in group:
                p = _same_layout(p_all[at:at + sizes[i]], logits_list[i])
                at += sizes[i]
                if not sizes[i]:
                    continue
                g = grad_nlls[i].to(lses[i].dtype)
                _softmax_grad_(p, lses[i], targets[i], g, torch.arange(p.size(0), device=p.device))
            if p_all is not block:
                block.copy_(p_all)                                          # one rounding to bf16 / fp16
        start = end


def _softmax_grad_(p: Tensor, lse: Tensor, target: Tensor, g: Tensor, rows: Tensor) -> Tensor:
    """p (float32 logits [n, V]) <- softmax * g, minus g at the target, in place; rows = arange(n)."""
    p.sub_(lse[:, None]).exp_()                                                  # softmax, float32
    p.mul_(g[:, None])
    p.index_put_((rows, target), -g, accumulate=True)                            # - g at the target
    return p


def nll_grad_logits_(logits: Tensor, lse: Tensor, target: Tensor, grad_nll: Tensor) -> Tensor:
    """d nll / d logits, computed in place of the logits (softmax * g, minus g at the target)."""
    grad = logits
    g = grad_nll.to(lse.dtype)
    step = _row_blocks(grad.size(0), grad.size(1), grad.device)
    rows = torch.arange(min(step, grad.size(0)), device=grad.device)
    for start in range(0, grad.size(0), step):
        block = grad[start:start + step]
        n = block.size(0)
        p = _softmax_grad_(block.to(lse.dtype), lse[start:start + step], target[start:start + step],
                           g[start:start + step], rows[:n])
        if p is not block:
            block.copy_(p)                                                       # one rounding to bf16 / fp16
    return grad


class _LinearNLL(torch.autograd.Function):

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
                weight_c: Optional[Tensor], bias_c: Optional[Tensor]) -> Tensor:
        dtype = _compute_dtype(hidden)
        h = hidden.to(dtype)
        w = weight_c if weight_c is not None and weight_c.dtype == dtype else weight.to(dtype)
        b = None if bias is None else bias_c if bias_c is not None and bias_c.dtype == dtype else bias.to(dtype)
        with torch.autocast(hidden.device.type, enabled=False):
            nll, logits, lse = nll_forward(h, w, b, target)
        ctx.save_for_backward(h, w, lse, target)
        ctx.logits = logits                     # reused in place by backward: not a saved tensor
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return nll

    @staticmethod
    def backward(ctx, grad_nll: Tensor):
        h, w, lse, target = ctx.saved_tensors
        logits = ctx.logits
        if logits is None:
            raise RuntimeError("the fused output-layer loss can be differentiated once per forward "
                               "(backward with retain_graph=True through it is not supported)")
        ctx.logits = None
        with torch.autocast(logits.device.type, enabled=False):
            grad = nll_grad_logits_(logits, lse, target, grad_nll)               # in place of the logits
            hidden_dtype, weight_dtype, bias_dtype = ctx.dtypes
            grad_hidden = grad_weight = grad_bias = None
            if ctx.needs_input_grad[0]:
                grad_hidden = logits_grad_input(grad, w).to(hidden_dtype)
            if ctx.needs_input_grad[1]:
                grad_weight = torch.mm(grad.t(), h).to(weight_dtype)
            if bias_dtype is not None and ctx.needs_input_grad[2]:
                grad_bias = grad.sum(0, dtype=lse.dtype).to(bias_dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None


def linear_nll(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
               weight_c: Optional[Tensor] = None, bias_c: Optional[Tensor] = None) -> Tensor:
    """hidden [N, d], weight [V, d], bias [V] or None, target [N] (ids in [0, V)) -> NLL [N], float32
    (float64 for float64 inputs). Equal to F.cross_entropy(F.linear(hidden, weight, bias).float(), target,
    reduction="none") with less memory. weight_c / bias_c: the same parameters already in the matmul dtype (a
    bf16 step's compute copies, utils/training/compute_weights.py), used instead of casting them here; the
    gradients still go to weight / bias."""
    return _LinearNLL.apply(hidden, weight, bias, target, weight_c, bias_c)
