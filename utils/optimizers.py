"""`--optim`: the optimizer over all trainable parameters, one parameter group, as in the reference.

| --optim   | optimizer                                               |
|-----------|---------------------------------------------------------|
| jitlamb   | `lamb.Lamb(lr, weight_decay, fused=True)` (multi-tensor) |
| lamb      | `lamb.Lamb(lr, weight_decay, fused=False)` (per tensor)  |
| adam      | `torch.optim.Adam(lr, weight_decay)`                    |
| sgd       | `torch.optim.SGD(lr, momentum=--mom)`                   |
| adagrad   | `torch.optim.Adagrad(lr)`                               |

No parameter is excluded from weight decay (the reference had no exclusion lists). The reference's separate
sparse optimizer for sampled softmax is not needed: our embeddings produce dense gradients.
"""
import torch

from lamb import Lamb
from utils.config import OPTIMIZERS
from utils.errors import UserError


def build_optimizer(args, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The optimizer named by `args.optim`, built from `args.lr`, `args.weight_decay` and `args.mom`."""
    params = [p for p in model.parameters() if p.requires_grad]
    name = args.optim.lower()
    if name == "jitlamb":
        return Lamb(params, lr=args.lr, weight_decay=args.weight_decay, fused=True)
    if name == "lamb":
        return Lamb(params, lr=args.lr, weight_decay=args.weight_decay, fused=False)
    if name == "adam":
        return torch.optim.Adam(params, lr=args.lr, weight_decay=args.weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=args.lr, momentum=args.mom)
    if name == "adagrad":
        return torch.optim.Adagrad(params, lr=args.lr)
    raise UserError(f"unknown --optim {args.optim!r}; choose one of {', '.join(OPTIMIZERS)}")
