"""The reference's weight initialization, and parameter counting.

init_weight(w) is N(0, init_std) for init='normal' and U(-init_range, init_range) for init='uniform':
    Linear weights, embedding tables, cluster_weight, untied output weights, r_emb / r_w_bias / r_r_bias
                                                -> init_weight
    embedding and output projections            -> N(0, proj_init_std)
    LayerNorm weights                           -> N(1, init_std) (whatever `init` is)
    every bias (Linear, LayerNorm, output layer, cluster_bias, r_bias)   -> 0
"""
from typing import Tuple

import torch
from torch import nn

from utils.model.adaptive_softmax import AdaptiveEmbedding, ProjectedAdaptiveLogSoftmax


def init_weights(model: nn.Module, init: str = "normal", init_range: float = 0.1, init_std: float = 0.02,
                 proj_init_std: float = 0.01) -> None:
    """Initialize a MemTransformerLM in place with the reference's rules (module docstring)."""
    if init not in ("normal", "uniform"):
        raise ValueError(f"init must be 'normal' or 'uniform', got {init!r}")

    def init_weight(w: torch.Tensor) -> None:
        if init == "uniform":
            nn.init.uniform_(w, -init_range, init_range)
        else:
            nn.init.normal_(w, 0.0, init_std)

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                init_weight(module.weight)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.Embedding):
                init_weight(module.weight)
            elif isinstance(module, nn.LayerNorm):
                nn.init.normal_(module.weight, 1.0, init_std)
                module.bias.zero_()
            elif isinstance(module, AdaptiveEmbedding):
                for p in module.emb_projs:
                    nn.init.normal_(p, 0.0, proj_init_std)
            elif isinstance(module, ProjectedAdaptiveLogSoftmax):
                if module.cluster_weight is not None:
                    init_weight(module.cluster_weight)
                    module.cluster_bias.zero_()
                for p in module.out_projs:
                    nn.init.normal_(p, 0.0, proj_init_std)
                for p in module.out_layers_weights:
                    init_weight(p)
                for p in module.out_layers_biases:
                    p.zero_()
        for name in ("r_emb", "r_w_bias", "r_r_bias"):
            if getattr(model, name, None) is not None:
                init_weight(getattr(model, name))
        if getattr(model, "r_bias", None) is not None:
            model.r_bias.zero_()


def count_parameters(model: nn.Module) -> Tuple[int, int]:
    """(all parameters, tied ones once; non-embedding parameters = those of model.layers), as the reference logs."""
    n_all = sum(p.numel() for p in model.parameters())
    n_nonemb = sum(p.numel() for p in model.layers.parameters())
    return n_all, n_nonemb
