"""Casting an activation to autocast's dtype once, where several autocast ops would each cast it."""
import torch
from torch import Tensor


def autocast_input(x: Tensor) -> Tensor:
    """x in the autocast dtype of its device when autocast is on there and x is a float32 tensor, else x.

    Autocast casts the float32 inputs of every lower-precision op (matmuls) separately, and caches only
    casts of parameters: an activation read by two linear layers, or by the same linear layer of every
    layer, is cast (and its gradient cast back) each time. Casting it once gives the same bf16 values in the
    forward; in the backward the gradients of its uses are summed in bf16 before the one cast back (instead
    of after each). Outside autocast (float32, float64 runs) nothing changes. Call it behind
    `not torch.jit.is_scripting()` (TorchScript runs without autocast).
    """
    device = x.device.type
    if x.dtype == torch.float32 and torch.is_autocast_enabled(device):
        return x.to(torch.get_autocast_dtype(device))
    return x
