"""Counting the host-device synchronizations of a piece of code, on any device (also the CPU, where they cost
nothing but show where a GPU run would wait).

    with HostSyncCounter() as syncs:
        step(...)
    syncs.count, syncs.events          # how many, and which (op names, in order)

A synchronization is anything that reads a tensor's value on the host or has an output whose size depends
on the data: `.item()`, `bool()`, `float()`, `int()` (all dispatch `aten._local_scalar_dense`), `.tolist()`,
`.numpy()`, `nonzero`, `masked_select`, `unique`, `repeat_interleave` without an output size, `torch.equal`,
and copies from an accelerator to the CPU. Ops are seen by a TorchDispatchMode (so calls from inside
PyTorch's own Python or C++ code count too, the backward pass included); `.tolist()` and `.numpy()` of a CPU
tensor bypass the dispatcher and are counted by wrapping those two methods.

On a GPU, `torch.cuda.set_sync_debug_mode("warn")` reports the same events from the driver's side.
"""
import torch
from torch.utils._python_dispatch import TorchDispatchMode

_aten = torch.ops.aten
# ops that read values back or size their output by the data
_SYNC_OPS = {
    _aten._local_scalar_dense.default, _aten.nonzero.default, _aten.masked_select.default,
    _aten.is_nonzero.default, _aten.equal.default, _aten._unique2.default, _aten.unique_dim.default,
    _aten.unique_consecutive.default, _aten.repeat_interleave.Tensor, _aten.nonzero_static.default,
}


class HostSyncCounter(TorchDispatchMode):
    """Counts synchronizing ops while active (see the module docstring)."""

    def __init__(self):
        super().__init__()
        self.events: list[str] = []
        self._saved = {}

    @property
    def count(self) -> int:
        return len(self.events)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _SYNC_OPS and not (func is _aten.repeat_interleave.Tensor and kwargs.get("output_size")):
            if func is not _aten.nonzero_static.default:       # static size: no sync
                self.events.append(str(func.overloadpacket.__name__))
        elif func in (_aten._to_copy.default, _aten.copy_.default):
            src = args[1] if func is _aten.copy_.default else args[0]
            dst_device = args[0].device if func is _aten.copy_.default else kwargs.get("device")
            if isinstance(src, torch.Tensor) and src.device.type not in ("cpu", "meta") \
                    and dst_device is not None and torch.device(dst_device).type == "cpu":
                self.events.append(f"{func.overloadpacket.__name__} to cpu")
        return func(*args, **kwargs)

    def __enter__(self):
        counter = self
        for name in ("tolist", "numpy"):
            original = getattr(torch.Tensor, name)
            self._saved[name] = original

            def wrapped(t, *args, _original=original, _name=name, **kwargs):
                counter.events.append(_name)
                return _original(t, *args, **kwargs)
            setattr(torch.Tensor, name, wrapped)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        self._saved.clear()
        return super().__exit__(*exc)
