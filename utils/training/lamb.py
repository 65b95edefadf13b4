"""LAMB with the reference trainer's math, as a plain per-tensor loop and as a multi-tensor implementation.

For every parameter tensor p with gradient g (one "layer" = one tensor, biases and LayerNorm included):

    m     <- beta1 * m + (1 - beta1) * g
    v     <- beta2 * v + (1 - beta2) * g * g
    u     <- m / (sqrt(v) + eps)                  no bias correction ("paper v3 does not use debiasing")
    u     <- u + weight_decay * p                 decay folded into the update direction
    w     <- clamp(||p||_2, 0, 10)
    n     <- ||u||_2
    trust <- 1 if w == 0 or n == 0 else w / (n + eps)        (adam=True: trust = 1 always)
    p     <- p - lr * trust * u

This is the math of the reference's `Lamb` / `JITLamb` (it differs from the LAMB paper: no bias correction,
a hard clamp as the scaling function, eps in the trust-ratio denominator, trust 1 for zero norms).

`fused=True` (what `--optim jitlamb` gives) runs the whole parameter list with `torch._foreach_*` kernels: the
norms come from `torch._foreach_norm` and the trust ratios are computed on the device with `torch.where`, so a
step has no per-tensor Python math and no GPU->CPU synchronisation. `fused=False` (`--optim lamb`) is the
plain loop, one tensor at a time. Both give the same results. `compile=True` (with fused, what `--compile`
gives) runs the multi-tensor step through torch.compile, on the CPU written tensor by tensor
(`_lamb_compiled_cpu`) so that inductor fuses each tensor's passes into a few loops; the learning rate then
enters as a device tensor, so a new value each step compiles nothing.

Eager on the CPU (issue 18): the fused step runs the same ops, op for op, block by block (`_BLOCK` elements of
every tensor at a time), so that a block's gradient, moments, parameter and update stay in the cache between
ops instead of each op streaming the whole 68M-element WikiText-103 table through memory again; the update
goes into a buffer kept between steps (one table-sized tensor, not two fresh ones per step). Every element
meets the same operations as in the multi-tensor version and the norms are still taken over whole tensors, so
the results are bit for bit those of the unblocked update (tests/test_lamb.py). Its ops run on one intra-op
thread (`_one_thread`: on a shared machine a thousand fork/joins cost more than the second core gives); with two
or more threads, two Python threads share the blocks instead (`_in_streams`: ATen releases the GIL, and a stream
never waits on the other between ops). On a GPU the multi-tensor kernels run as before.

Gradient clipping in the same pass (issue 18): the caller (TrainStep) computes the total gradient norm (one
reduction over all gradients, which must precede any update) and sets `optimizer.clip_coef` =
min(1, max_norm / (norm + 1e-6)) (a device tensor) before `step()`, as GradScaler sets `found_inf`; the step
multiplies the gradients by it inside the multi-tensor update (under torch.compile fused into the update's
passes) instead of a separate pass of `clip_grad_norm_`. Same math as `torch.nn.utils.clip_grad_norm_` (the
CPU steps, eager and compiled, use the clipped values without writing them back into `.grad`).

Mixed precision: the fused step handles the fp16 GradScaler's skip decision on the device
(`_step_supports_amp_scaling`): the scaler hands over `found_inf` instead of reading it back to the host,
and a step with non-finite gradients leaves the parameters and the running averages exactly as they were.

State per parameter: `exp_avg` (m), `exp_avg_sq` (v) tensors and `step` (an int, counted but unused by the
math), so `optimizer.state_dict()` holds tensors and plain types only and loads with `weights_only=True`.
"""
import contextlib
import os
from collections import defaultdict
from typing import Callable, Iterable

import torch
from torch.optim import Optimizer


class Lamb(Optimizer):
    """LAMB as in the reference trainer (see the module docstring for the exact update).

    Args:
        params: parameters or parameter groups.
        lr: learning rate.
        betas: coefficients of the running averages of the gradient and of its square.
        eps: added to sqrt(v) and to the update norm in the trust ratio.
        weight_decay: factor of p added to the update direction.
        adam: force the trust ratio to 1 (Adam without bias correction, decay in the update).
        fused: multi-tensor implementation (`torch._foreach_*`); False runs the plain per-tensor loop.
        compile: run the fused step through torch.compile (fused=True only; see the module docstring).
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        adam: bool = False,
        fused: bool = True,
        compile: bool = False,
    ):
        if not lr >= 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not eps >= 0.0:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= betas[0] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
        if not weight_decay >= 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, adam=adam, fused=fused)
        super().__init__(params, defaults)
        # not a group option: the state dict stays the same with and without compilation
        # the multi-tensor update (GPU, DTensors: foreach kernels, one collective per norm list) and the
        # per-tensor one inductor fuses best on the CPU; each compiles on first use
        self._compiled_update = torch.compile(_lamb_multi_tensor, dynamic=False) if compile else None
        self._compiled_cpu_update = torch.compile(_lamb_compiled_cpu, dynamic=False) if compile else None
        self._lr_tensors: dict[torch.device, torch.Tensor] = {}
        # GradScaler: the fused step takes found_inf as a device tensor (no read-back); see step(). Not for
        # DTensor parameters (FSDP, --tensor_parallel): the scaler then decides on the host as before.
        self._step_supports_amp_scaling = bool(fused) and not any(
            hasattr(p, "device_mesh") for group in self.param_groups for p in group["params"])
        self.clip_coef: torch.Tensor | None = None           # set by the caller for one step (see the docstring)
        # eager CPU step: one update buffer per parameter, kept between steps (not state: never saved)
        self._update_buffers: dict[torch.Tensor, torch.Tensor] = {}

    def _lr_tensor(self, lr: float, device: torch.device) -> torch.Tensor:
        """lr as a float32 scalar tensor on `device` (the compiled step reads it; no recompilation)."""
        if device not in self._lr_tensors:
            self._lr_tensors[device] = torch.zeros((), dtype=torch.float32, device=device)
        return self._lr_tensors[device].fill_(lr)

    def _update_buffer(self, p: torch.Tensor) -> torch.Tensor:
        buffer = self._update_buffers.get(p)
        if buffer is None or buffer.shape != p.shape or buffer.dtype != p.dtype or buffer.device != p.device:
            buffer = self._update_buffers[p] = torch.empty_like(p, memory_format=torch.contiguous_format)
        return buffer

    def keep_trust_ratios(self) -> None:
        """From now on each step leaves its trust ratios (one per parameter, lr excluded) in `trust_ratios`, a
        device tensor (--log_noise_scale logs them; nothing is read to the host here)."""
        self._keep_trust = True

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        """One LAMB step over every parameter that has a gradient; returns the closure's loss, if any."""
        loss = None
        ratios = []
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # set by torch.amp.GradScaler.step for an optimizer with _step_supports_amp_scaling
        found_inf = getattr(self, "found_inf", None)
        grad_scale = getattr(self, "grad_scale", None)
        all_grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        if grad_scale is not None:                           # the scaler did not unscale them yet
            torch._foreach_mul_(all_grads, grad_scale.double().reciprocal().float())
        clip_coef, self.clip_coef = self.clip_coef, None     # for this step only

        for group in self.param_groups:
            # (device, dtype) -> [params, grads, exp_avgs, exp_avg_sqs]; foreach kernels want uniform lists
            buckets: dict[tuple, list[list[torch.Tensor]]] = defaultdict(lambda: [[], [], [], []])
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if grad.is_sparse or grad.layout != torch.strided:
                    raise RuntimeError(
                        f"Lamb does not support sparse gradients (parameter of shape {tuple(p.shape)}); "
                        "use dense gradients (e.g. nn.Embedding(sparse=False)) or another optimizer"
                    )
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                # DTensors (FSDP, --tensor_parallel) apart from tensors, and by mesh: foreach kernels take one kind
                mesh = getattr(p, "device_mesh", None)
                bucket = buckets[(p.device, p.dtype, None if mesh is None else id(mesh))]
                for lst, t in zip(bucket, (p, grad, state["exp_avg"], state["exp_avg_sq"])):
                    lst.append(t)

            compiled = group["fused"] and self._compiled_update is not None
            beta1, beta2 = group["betas"]
            for (device, _, mesh), (params, grads, exp_avgs, exp_avg_sqs) in buckets.items():
                # chosen per bucket: FSDP and tensor parallel mix DTensor buckets with plain ones
                update = _lamb_multi_tensor if group["fused"] else _lamb_per_tensor
                if compiled:
                    update = self._compiled_cpu_update if device.type == "cpu" and mesh is None \
                        else self._compiled_update
                lr = self._lr_tensor(group["lr"], device) if compiled else group["lr"]
                extra = {}
                if clip_coef is not None:
                    if group["fused"]:
                        extra["clip_coef"] = clip_coef.to(device)
                    else:
                        torch._foreach_mul_(grads, clip_coef.to(device))
                if found_inf is not None:
                    if not group["fused"]:
                        raise RuntimeError("Lamb(fused=False) does not take the GradScaler's found_inf")
                    extra["found_inf"] = found_inf.to(device)
                elif group["fused"] and not compiled and device.type == "cpu" and CPU_BLOCKED_UPDATE \
                        and not hasattr(params[0], "device_mesh"):
                    update = _lamb_blocked
                    extra["buffers"] = [self._update_buffer(p) for p in params]
                with _one_thread() if update is _lamb_blocked else contextlib.nullcontext() as threads:
                    if update is _lamb_blocked:
                        extra["streams"] = min(2, threads)
                    trust = update(
                        params, grads, exp_avgs, exp_avg_sqs,
                        lr=lr, beta1=beta1, beta2=beta2, eps=group["eps"],
                        weight_decay=group["weight_decay"], adam=group["adam"], **extra,
                    )
                if trust is not None and getattr(self, "_keep_trust", False):
                    trust = torch.stack(trust) if isinstance(trust, list) else trust
                    ratios.append(trust.detach().float().reshape(-1).to(ratios[0].device if ratios else device))
        if ratios:
            self.trust_ratios = torch.cat(ratios)
        return loss


def _lamb_per_tensor(params, grads, exp_avgs, exp_avg_sqs, *, lr, beta1, beta2, eps, weight_decay, adam):
    """The update of the module docstring, one tensor at a time (syncs with the device for the zero tests);
    returns the trust ratios, a list of scalar tensors (None with adam)."""
    trusts = []
    for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs):
        m.mul_(beta1).add_(g, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        u = m / v.sqrt().add_(eps)
        if weight_decay != 0:
            u.add_(p, alpha=weight_decay)
        if not adam:
            w_norm = p.norm(2).clamp(0, 10)
            u_norm = u.norm(2)
            trust = w_norm / (u_norm + eps) if w_norm != 0 and u_norm != 0 else torch.ones_like(w_norm)
            u.mul_(trust)
            trusts.append(trust)
        p.add_(u, alpha=-lr)
    return trusts or None


def _lamb_multi_tensor(params, grads, exp_avgs, exp_avg_sqs, *, lr, beta1, beta2, eps, weight_decay, adam,
                       clip_coef=None, found_inf=None):
    """The same update with multi-tensor kernels; all tensors share one device and dtype. No host syncs.
    lr is a float or (compiled step) a scalar tensor. Returns the trust ratios (None with adam). clip_coef (a
    scalar tensor): the gradient-clipping factor, applied here (as clip_grad_norm_ would: gradients multiplied
    in place). found_inf (fp16 scaler, a float tensor, > 0: a gradient is not finite): nothing changes,
    decided on the device."""
    if clip_coef is not None:
        torch._foreach_mul_(grads, clip_coef)
    if found_inf is not None:
        return _skip_if_found_inf(params, grads, exp_avgs, exp_avg_sqs, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                                  weight_decay=weight_decay, adam=adam, found_inf=found_inf)
    ratios = None
    updates = _moment_updates(params, grads, exp_avgs, exp_avg_sqs, beta1, beta2, beta1=beta1, beta2=beta2, eps=eps,
                              weight_decay=weight_decay)
    if not adam:
        trust = ratios = _trust_ratios(params, updates, eps)
        if isinstance(lr, torch.Tensor):
            trust = trust * lr
        torch._foreach_mul_(updates, trust.unbind(0))
    elif isinstance(lr, torch.Tensor):
        torch._foreach_mul_(updates, lr)
    if isinstance(lr, torch.Tensor):
        torch._foreach_sub_(params, updates)
    else:
        torch._foreach_add_(params, updates, alpha=-lr)
    return ratios


def _lamb_compiled_cpu(params, grads, exp_avgs, exp_avg_sqs, *, lr, beta1, beta2, eps, weight_decay, adam,
                   clip_coef=None, found_inf=None):
    """What torch.compile runs on the CPU (`compile=True`): `_lamb_multi_tensor`'s update written tensor by
    tensor, so that inductor fuses each tensor's passes: the moments, the direction and its norm in one loop over
    the tensor, the parameter update (the direction recomputed from the moments, never stored) in a second, plus
    one for the parameter's norm; `_foreach_norm` would instead be a separate library call over a stored direction.
    For the 68M-element WikiText-103 table that is 10 streams over it instead of 13. Like `_lamb_blocked`, the
    clipped gradient is not written back to `.grad`. The found_inf path (fp16) is the multi-tensor one."""
    if found_inf is not None:
        return _lamb_multi_tensor(params, grads, exp_avgs, exp_avg_sqs, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                                  weight_decay=weight_decay, adam=adam, clip_coef=clip_coef, found_inf=found_inf)
    ratios = []
    for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs):
        if clip_coef is not None:
            g = g * clip_coef
        m.mul_(beta1).add_(g, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        u = m / (v.sqrt() + eps)
        if weight_decay != 0:
            u = u + weight_decay * p
        if adam:
            p.sub_(u * lr)
            continue
        w_norm = torch.linalg.vector_norm(p).clamp(0, 10)
        u_norm = torch.linalg.vector_norm(u)
        trust = torch.where((w_norm == 0) | (u_norm == 0), torch.ones_like(w_norm), w_norm / (u_norm + eps))
        ratios.append(trust)
        p.sub_(u * (trust * lr))
    return torch.stack(ratios) if ratios else None


# Elements per block of the eager CPU update: 1 MiB of float32 per tensor; the five tensors a block touches
# (gradient, two moments, parameter, update) fit in a core's L2 / the L3 slice.
_BLOCK = 1 << 18
# False: the eager CPU update runs unblocked (the multi-tensor ops a GPU runs; same bits). The op count of
# `scripts/benchmark_train.py --report` switches it off: it counts the launches of a GPU's step.
CPU_BLOCKED_UPDATE = True


@contextlib.contextmanager
def _one_thread():
    """The blocked update with one intra-op thread per stream: its ~1,000 small ops would each be a fork/join of
    the intra-op threads, and on a shared machine every join waits for a descheduled partner (two threads per
    block op made the step slower than before in an alternated round at load 6). Yields the thread count it
    found: that many streams (at most 2) then share the blocks (`_in_streams`)."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield 1
        return
    torch.set_num_threads(1)
    try:
        yield threads
    finally:
        torch.set_num_threads(threads)


_POOL: dict = {}                                 # pid -> the second stream's thread, started on first use


def _second_stream():
    # one per process: a forked child (a DataLoader worker, a test's rank) inherits no running thread
    pid = os.getpid()
    if pid not in _POOL:
        import concurrent.futures
        _POOL.clear()
        _POOL[pid] = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="lamb-stream")
    return _POOL[pid]


def _no_grad_call(fn, *args):
    with torch.no_grad():                        # grad mode is per thread: in-place updates of the parameters
        return fn(*args)


def _in_streams(fn, items: list, streams: int) -> None:
    """fn(items) on `streams` (1 or 2) Python threads, each with its share of the items by element count (the
    first tensor of each item). ATen ops release the GIL, so two single-threaded streams use two cores without
    a fork/join per op; when only one core is free they take turns and cost what one stream costs. Every item
    meets the same ops in either stream: same bits."""
    if streams < 2 or len(items) < 2:
        fn(items)
        return
    sizes = [item[0].numel() for item in items]
    half, total, cut = sum(sizes) / 2, 0, len(items)
    for i, size in enumerate(sizes):
        total += size
        if total >= half:
            cut = i + 1
            break
    later = _second_stream().submit(_no_grad_call, fn, items[cut:])
    try:
        fn(items[:cut])
    finally:
        later.result()


def _blocks(*tensors: torch.Tensor):
    """Matching flat views of [_BLOCK] elements of same-shaped contiguous tensors (one block when not contiguous)."""
    if not all(t.is_contiguous() for t in tensors) or tensors[0].numel() <= _BLOCK:
        yield tensors
        return
    flat = [t.view(-1) for t in tensors]
    for start in range(0, flat[0].numel(), _BLOCK):
        yield tuple(f[start:start + _BLOCK] for f in flat)


def _scratch(scratch: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """A flat buffer of at least like.numel() elements of like's dtype and device (grown when needed)."""
    if scratch is None or scratch.numel() < like.numel() or scratch.dtype != like.dtype or scratch.device != like.device:
        scratch = torch.empty(like.numel(), dtype=like.dtype, device=like.device)
    return scratch


def _lamb_blocked(params, grads, exp_avgs, exp_avg_sqs, *, lr, beta1, beta2, eps, weight_decay, adam, buffers,
                  clip_coef=None, streams=1):
    """`_lamb_multi_tensor`'s update (no found_inf), op for op, block by block (module docstring): the
    moments and the direction of each block while it is in the cache, into `buffers` (one per parameter);
    then the norms over whole tensors (the same reductions as the multi-tensor version: same bits), then the
    parameters block by block. Returns the trust ratios (None with adam). Unlike the multi-tensor version it
    writes neither the clipped gradient back to `grads` nor the scaled update back to `buffers` (two passes
    over the table less); parameters and moments are bit for bit the same. `streams` (1 or 2): Python threads
    sharing the blocks, and the two kinds of norms (`_in_streams`)."""

    def directions(blocks):
        scratch = None                           # a block's clipped gradient (values only)
        for pb, gb, mb, vb, ub in blocks:
            if clip_coef is not None:
                # the clipped values, not written back to the gradient (one stream over the table less)
                scratch = _scratch(scratch, gb)
                gb = torch.mul(gb, clip_coef, out=scratch[:gb.numel()].view_as(gb))
            mb.mul_(beta1)
            mb.add_(gb, alpha=1 - beta1)
            vb.mul_(beta2)
            vb.addcmul_(gb, gb, value=1 - beta2)
            torch.sqrt(vb, out=ub)
            ub.add_(eps)
            torch.div(mb, ub, out=ub)
            if weight_decay != 0:
                ub.add_(pb, alpha=weight_decay)

    def updates(blocks):
        scratch = None                           # a block's scaled update (not written back either)
        for pb, ub, factor in blocks:
            if factor is not None:
                scratch = _scratch(scratch, ub)
                ub = torch.mul(ub, factor, out=scratch[:ub.numel()].view_as(ub))
            if isinstance(lr, torch.Tensor):
                pb.sub_(ub)
            else:
                pb.add_(ub, alpha=-lr)

    _in_streams(directions, [b for ts in zip(params, grads, exp_avgs, exp_avg_sqs, buffers) for b in _blocks(*ts)],
                streams)
    ratios = factors = None
    if not adam:
        if streams >= 2:                         # the parameters' norms beside the directions' norms
            later = _second_stream().submit(_no_grad_call, torch._foreach_norm, params)
            u_norms = torch._foreach_norm(buffers)
            factors = ratios = _trust_ratio_of_norms(later.result(), u_norms, eps)
        else:
            factors = ratios = _trust_ratios(params, buffers, eps)
        if isinstance(lr, torch.Tensor):
            factors = factors * lr
        factors = factors.unbind(0)
    default = lr if isinstance(lr, torch.Tensor) else None
    _in_streams(updates, [(pb, ub, factors[i] if factors is not None else default)
                          for i, (p, u) in enumerate(zip(params, buffers)) for pb, ub in _blocks(p, u)], streams)
    return ratios


def _moment_updates(params, grads, exp_avgs, exp_avg_sqs, decay1, decay2, *, beta1, beta2, eps, weight_decay):
    """Update the moments in place (decayed by decay1 / decay2: beta1 / beta2, or tensors) and return the Adam
    directions m / (sqrt(v) + eps) plus the weight decay, one tensor per parameter."""
    torch._foreach_mul_(exp_avgs, decay1)
    torch._foreach_add_(exp_avgs, grads, alpha=1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, decay2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_add_(denom, eps)
    updates = torch._foreach_div(exp_avgs, denom)
    del denom
    if weight_decay != 0:
        torch._foreach_add_(updates, params, alpha=weight_decay)
    return updates


def _trust_ratios(params, updates, eps) -> torch.Tensor:
    """LAMB's trust ratio per parameter, ||w|| (clamped to 10) / ||update||, 1 where either norm is 0."""
    return _trust_ratio_of_norms(torch._foreach_norm(params), torch._foreach_norm(updates), eps)


def _trust_ratio_of_norms(w_norms, u_norms, eps) -> torch.Tensor:
    w_norms = torch.stack(w_norms).clamp(0, 10)                        # not in place: DTensors (FSDP)
    u_norms = torch.stack(u_norms)
    return torch.where((w_norms == 0) | (u_norms == 0), torch.ones_like(w_norms), w_norms / (u_norms + eps))


def _skip_if_found_inf(params, grads, exp_avgs, exp_avg_sqs, *, lr, beta1, beta2, eps, weight_decay, adam, found_inf):
    """The multi-tensor update that changes nothing when found_inf > 0, decided on the device, without copies of
    the parameters: non-finite gradients become 0, the moments' decay factors become 1 and the update is
    multiplied by 0. When found_inf == 0 every factor is exactly 1 and the result is bit for bit the update."""
    keep = (found_inf == 0).to(params[0].dtype)                            # 1.0 or 0.0
    ratios = None
    torch._foreach_mul_(grads, keep)                                       # inf * 0 = nan: cleared next
    for g in grads:
        g.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
    # the moments decay by beta, or by 1 when skipped
    updates = _moment_updates(params, grads, exp_avgs, exp_avg_sqs, beta1 * keep + (1 - keep),
                              beta2 * keep + (1 - keep), beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)
    if not adam:
        trust = ratios = _trust_ratios(params, updates, eps)
        factor = trust * keep                                              # trust * 1 == trust exactly
        if isinstance(lr, torch.Tensor):
            factor = factor * lr
        torch._foreach_mul_(updates, factor.unbind(0))
    else:
        torch._foreach_mul_(updates, keep * lr if isinstance(lr, torch.Tensor) else keep)
    if isinstance(lr, torch.Tensor):
        torch._foreach_sub_(params, updates)
    else:
        torch._foreach_add_(params, updates, alpha=-lr)
    return ratios
