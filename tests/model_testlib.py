"""Helpers for the model tests: tiny float64 models with every parameter random (biases included)."""
import math

import torch

from mem_transformer import MemTransformerLM

# The attention implementation tiny_model sets; the `attn_impl` fixture (conftest.py) runs a test module
# once per implementation by changing it.
ATTN_IMPL = "math"


def tiny_model(attn_type=0, n_layer=2, n_token=40, d_model=16, n_head=2, d_head=8, d_inner=24, tgt_len=6,
               ext_len=0, mem_len=6, seed=0, dtype=torch.float64, **kwargs):
    """A small MemTransformerLM in eval mode whose parameters are all random (so no term can hide), computing
    attention with ATTN_IMPL."""
    torch.manual_seed(seed)
    kwargs.setdefault("dropout", 0.0)
    kwargs.setdefault("dropatt", 0.0)
    model = MemTransformerLM(n_token, n_layer, n_head, d_model, d_head, d_inner, tgt_len=tgt_len,
                             ext_len=ext_len, mem_len=mem_len, attn_type=attn_type, **kwargs)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.3 if "layer_norm" not in name else 0.1
            p.copy_(torch.randn_like(p) * scale + (1.0 if name.endswith("layer_norm.weight") else 0.0))
    model.set_attn_impl(ATTN_IMPL)
    return model.to(dtype).eval()


def sinusoid(distance: float, d_model: int) -> list:
    """The positional embedding of one distance, element by element (sin block, then cos block)."""
    inv = [1.0 / 10000 ** (2 * k / d_model) for k in range(d_model // 2)]
    return [math.sin(distance * f) for f in inv] + [math.cos(distance * f) for f in inv]


def tokens(length, bsz, n_token, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, n_token, (length, bsz), generator=g)


def spec_log_probs(h, bounds, weights, biases, projs, cluster_weight, cluster_bias):
    """§2.7 as loops: head = shortlist rows ++ cluster rows; token of tail cluster i uses head column -i."""
    def logit(x, w, b, p):
        return torch.dot(x if p is None else x @ p, w) + b

    n_clusters = len(bounds) - 2
    out = torch.empty(h.size(0), bounds[-1], dtype=h.dtype)
    for n, x in enumerate(h):
        head = [logit(x, weights[0][v], biases[0][v], projs[0]) for v in range(bounds[1])]
        head += [logit(x, cluster_weight[c], cluster_bias[c], projs[0]) for c in range(n_clusters)]
        head_lp = torch.log_softmax(torch.stack(head), 0)
        for v in range(bounds[1]):
            out[n, v] = head_lp[v]
        for i in range(1, n_clusters + 1):
            tail = [logit(x, weights[i][v], biases[i][v], projs[i]) for v in range(bounds[i + 1] - bounds[i])]
            tail_lp = torch.log_softmax(torch.stack(tail), 0)
            for v in range(len(tail)):
                out[n, bounds[i] + v] = head_lp[-i] + tail_lp[v]
    return out
