"""`--optim`: the optimizer over all trainable parameters, one parameter group, as in the reference.

| --optim   | optimizer                                               |
|-----------|---------------------------------------------------------|
| jitlamb   | `lamb.Lamb(lr, weight_decay, fused=True)` (multi-tensor; compiled with `--compile`) |
| lamb      | `lamb.Lamb(lr, weight_decay, fused=False)` (per tensor)  |
| adam      | `torch.optim.Adam(lr, weight_decay)` (the fused kernel on CUDA) |
| sgd       | `torch.optim.SGD(lr, momentum=--mom)`                   |
| adagrad   | `torch.optim.Adagrad(lr)`                               |

No parameter is excluded from weight decay (the reference had no exclusion lists). The reference's separate
sparse optimizer for sampled softmax is not needed: our embeddings produce dense gradients.
"""
import torch

from utils.training.lamb import Lamb
from utils.config.schema import OPTIMIZERS
from utils.io.errors import UserError


def build_optimizer(args, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The optimizer named by `args.optim`, built from `args.lr`, `args.weight_decay` and `args.mom`."""
    params = [p for p in model.parameters() if p.requires_grad]
    name = args.optim.lower()
    if name == "jitlamb":
        return Lamb(params, lr=args.lr, weight_decay=args.weight_decay, fused=True,
                    compile=bool(args.compile))
    if name == "lamb":
        return Lamb(params, lr=args.lr, weight_decay=args.weight_decay, fused=False)
    if name == "adam":
        fused = bool(params) and all(p.is_cuda and p.is_floating_point() for p in params)
        return torch.optim.Adam(params, lr=args.lr, weight_decay=args.weight_decay, fused=fused or None)
    if name == "sgd":
        return torch.optim.SGD(params, lr=args.lr, momentum=args.mom)
    if name == "adagrad":
        return torch.optim.Adagrad(params, lr=args.lr)
    raise UserError(f"unknown --optim {args.optim!r}; choose one of {', '.join(OPTIMIZERS)}")
