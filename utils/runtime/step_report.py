"""What one training step costs in the units a GPU cares about, measured on any device (issue 18):
`scripts/benchmark_train.py --report`.

    eager ATen ops     ops the dispatcher runs for one eager step (forward, backward, clipping, optimizer);
                       each is a kernel launch on a GPU. Casts: `_to_copy` ops that change the dtype.
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


class OpCounter(TorchDispatchMode):
    """Counts the ATen ops dispatched while active, and the dtype casts among them."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()
        self.casts = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        self.ops[name] += 1
        if name == "_to_copy" and isinstance(args[0], torch.Tensor) and isinstance(out, torch.Tensor) \
                and out.dtype != args[0].dtype:
            self.casts += 1
        return out

    @property
    def total(self) -> int:
        return sum(self.ops.values())


def count_ops(step_fn) -> dict:
    with OpCounter() as counter:
        step_fn()
    return {"aten_ops": counter.total, "casts": counter.casts,
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
