"""Casting an activation to bf16 once under bf16 autocast, where several autocast ops would each cast it."""
import torch
from torch import Tensor


def autocast_input(x: Tensor) -> Tensor:
    """x in bf16 when bf16 autocast is on for its device and x is a float32 tensor, else x.

    Autocast casts the float32 inputs of every lower-precision op (matmuls) separately, and caches only
    casts of parameters: an activation read by two linear layers, or by the same linear layer of every
    layer, is cast (and its gradient cast back) each time. Casting it once gives the same bf16 values in the
    forward; in the backward the gradients of its uses are summed in bf16 before the one cast back (instead
    of after each). Outside autocast (float32, float64 runs) nothing changes; fp16 autocast keeps its casts
    (fp16 gradients summed before the cast back could overflow under the loss scale where float32 sums do
    not). Call it behind `not torch.jit.is_scripting()` (TorchScript runs without autocast).
    """
    device = x.device.type
    if x.dtype == torch.float32 and torch.is_autocast_enabled(device) \
            and torch.get_autocast_dtype(device) == torch.bfloat16:
        return x.to(torch.bfloat16)
    return x
