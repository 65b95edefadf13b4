"""What one training step costs in the units a GPU cares about, measured on any device (issue 18):
`scripts/benchmark_train.py --report`.

    eager ATen ops     ops the dispatcher runs for one eager steady-state step (a step run before it, not
                       counted, builds lazy state): forward + loss, backward, clipping + optimizer, counted
                       at the Python dispatch key (below autograd and autocast, so autocast's casts and the
                       backward's ops are in; a multi-tensor `_foreach_*` op counts once, as it launches a few
                       kernels on a GPU). Views (view, t, permute, detach, ...) are counted too although they
                       launch no kernel; `views` says how many. On the CPU some ops decompose more than on
                       CUDA (dropout: empty_like + bernoulli_ + div_ + mul, one native_dropout on CUDA).
                       Casts: ops that only convert the dtype: `_to_copy`, `copy_` and `_foreach_copy_`
                       whose source and destination dtypes differ (arithmetic that promotes mixed dtypes
                       inside the op is not a cast op; those are counted apart as `mixed-dtype ops`: ops
                       other than casts whose floating-point inputs and outputs are not all of one dtype,
                       e.g. a float32 residual plus a bf16 branch, or a bf16 sum into float32). benchmark_train.py counts LAMB's multi-tensor
                       update (the GPU's), not the eager CPU's block-by-block run of the same ops.
    graph breaks       torch._dynamo.explain of the training forward (model + loss)
    compilations       graphs dynamo compiled over the whole run (torch._dynamo counters)
    host syncs         HostSyncCounter over one steady-state step (utils/runtime/host_sync.py)

Standalone on purpose: it imports nothing of the project but host_sync (by file path), so that
`benchmark_train.py --repo OTHER_CHECKOUT --report` can measure another version of the code side by side.
"""
import collections
import importlib.util
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def _host_sync_module():
    path = Path(__file__).resolve().parent / "host_sync.py"
    spec = importlib.util.spec_from_file_location("_issue18_host_sync", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ops that only give a view or the same tensor: no kernel on any device
VIEW_OPS = {"view", "_unsafe_view", "t", "transpose", "permute", "expand", "slice", "select", "unsqueeze",
            "squeeze", "detach", "alias", "as_strided", "unbind", "split", "split_with_sizes", "unfold",
            "lift_fresh", "_reshape_alias", "diagonal", "narrow"}
CAST_OPS = {"_to_copy", "copy_", "_foreach_copy_"}


def _dtypes(x) -> list:
    if isinstance(x, torch.Tensor):
        return [x.dtype]
    if isinstance(x, (list, tuple)):
        return [t.dtype for t in x if isinstance(t, torch.Tensor)]
    return []


def _floating_dtypes(*groups) -> set:
    return {d for group in groups for x in group for d in _dtypes(x) if d.is_floating_point}


class OpCounter(TorchDispatchMode):
    """Counts the ATen ops dispatched while active, the dtype casts and the views among them, by phase:
    backward (run by the autograd engine), after the last backward (gradient collection, clipping, the
    optimizer step), forward (the other ops: forward and loss of every batch chunk)."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()
        self.casts = 0
        self.mixed = 0                      # non-cast ops whose floating-point tensors are of several dtypes
        self.views = 0
        self.phases = collections.Counter()
        self._since_backward = 0            # ops since the last backward op: forward, or after the last backward

    def _count_phase(self) -> None:
        if torch._C._current_graph_task_id() != -1:
            self.phases["backward"] += 1
            self.phases["forward"] += self._since_backward
            self._since_backward = 0
        else:
            self._since_backward += 1

    @property
    def by_phase(self) -> dict:
        seen_backward = self.phases["backward"] > 0
        return {"forward": self.phases["forward"] + (0 if seen_backward else self._since_backward),
                "backward": self.phases["backward"],
                "optimizer": self._since_backward if seen_backward else 0}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        self.ops[name] += 1
        self._count_phase()
        if name in VIEW_OPS:
            self.views += 1
        if name in CAST_OPS:
            source = _dtypes(args[0] if name == "_to_copy" else args[1])
            result = _dtypes(out if name == "_to_copy" else args[0])
            if source != result:
                self.casts += 1
        elif len(_floating_dtypes(args, kwargs.values(), [out])) > 1:
            self.mixed += 1
        return out

    @property
    def total(self) -> int:
        return sum(self.ops.values())


def count_ops(step_fn) -> dict:
    """Ops of the second of two calls of step_fn (the first builds lazy state: optimizer moments, buffers)."""
    step_fn()
    with OpCounter() as counter:
        step_fn()
    return {"aten_ops": counter.total, "casts": counter.casts, "mixed_dtype_ops": counter.mixed,
            "views": counter.views,
            "ops_by_phase": counter.by_phase,
            "top_ops": dict(counter.ops.most_common(8))}


def count_syncs(step_fn) -> dict:
    with _host_sync_module().HostSyncCounter() as syncs:
        step_fn()
    return {"host_syncs": syncs.count, "sync_ops": dict(collections.Counter(syncs.events))}


def graph_breaks(model, data, target, mems) -> dict:
    """torch._dynamo.explain of model(data, target, mems) followed by the mean loss."""
    def loss_of(d, t, m):
        loss, new_mems = model(d, t, m)
        return loss.float().mean(), new_mems
    explained = torch._dynamo.explain(loss_of)(data, target, mems)
    reasons = collections.Counter(str(r.reason).splitlines()[0][:120] for r in explained.break_reasons)
    return {"graph_breaks": explained.graph_break_count, "graphs": explained.graph_count,
            "break_reasons": dict(reasons)}


def compiled_graphs() -> int:
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])
