"""Training FLOPs per token of a MemTransformerLM, from its model_config, and model FLOPs utilization (MFU).

Counted: the multiply-adds (MACs) of the forward pass per target token, times 6 for a training step (2 FLOPs
per MAC forward, 4 backward), for everything the implementation computes:

    per layer   q:        d_model · H·Dh
                k, v:     2 · d_model · H·Dh · klen / qlen     (memory keys are projected again each segment)
                out:      H·Dh · d_model
                ff:       2 · d_model · d_inner
                scores:   3 · klen · H·Dh                       (q·k, q·r, p·v over all klen keys)
    output      head:     (shortlist + n_clusters) · d_emb_0 (+ d_model · d_emb_0 when projected)
                tail i:   fraction_i · (size_i · d_emb_i (+ d_model · d_emb_i when projected))
    input       projections of the adaptive input: d_emb_i · d_model per token for every cluster i (div_val > 1:
                each cluster projects every token and keeps its own, so that no shape depends on the data)

with qlen = tgt_len + ext_len and klen = qlen + mem_len. fraction_i is the share of target tokens in tail
cluster i (it depends on the data; word frequencies follow Zipf's law, so the tails are a few percent).
Left out (each well under 1%): r_net (once per segment, not per token), layer norms, softmax exponentials,
embedding lookups, the optimizer step. The masked half of the score matrix is counted: the kernels compute it.

MFU = tokens/s · FLOPs/token / peak FLOP/s, with the peak of the device's datasheet for dense bf16 tensor
math (whatever precision the run used, as is customary).
"""
from typing import Dict, List, Optional, Sequence

# Dense bf16 (fp16 for V100) tensor-core peaks from the vendors' datasheets, in FLOP/s; the first name
# contained in torch.cuda.get_device_name() wins.
PEAK_FLOPS: List[tuple] = [
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),          # SXM
    ("A100", 312e12),
    ("A10G", 70e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("V100", 125e12),
]


def peak_flops(device_name: str) -> Optional[float]:
    """The datasheet dense bf16 peak of a GPU by name, or None when unknown (e.g. a CPU)."""
    for key, value in PEAK_FLOPS:
        if key in device_name:
            return value
    return None


def cluster_sizes(n_token: int, cutoffs: Sequence[int]) -> List[int]:
    bounds = [0] + list(cutoffs) + [n_token]
    return [hi - lo for lo, hi in zip(bounds, bounds[1:])]


def cluster_fractions(counts: Sequence[int]) -> List[float]:
    total = sum(counts)
    return [c / total for c in counts] if total else [1.0] + [0.0] * (len(counts) - 1)


def training_flops_per_token(config: Dict, fractions: Optional[Sequence[float]] = None) -> float:
    """FLOPs of one training step per target token (module docstring). `config` is a model_config;
    `fractions` the share of target tokens per cluster (shortlist first), needed with cutoffs."""
    d, n_head, d_head = config["d_model"], config["n_head"], config["d_head"]
    n_layer, d_inner = config["n_layer"], config["d_inner"]
    hd = n_head * d_head
    qlen = config["tgt_len"] + (config.get("ext_len") or 0)
    klen = qlen + (config.get("mem_len") or 0)
    layer = d * hd + 2 * d * hd * klen / qlen + hd * d + 2 * d * d_inner + 3 * klen * hd
    if config.get("attn_type", 0) in (2, 3):
        layer -= klen * hd                                                      # no position term

    n_token, cutoffs = config["n_token"], list(config.get("cutoffs") or [])
    d_embed = config.get("d_embed") or d
    if d_embed < 0:
        d_embed = d
    div_val = config.get("div_val", 1)
    sizes = cluster_sizes(n_token, cutoffs)
    if fractions is None:
        if cutoffs:
            raise ValueError("an adaptive softmax needs the share of tokens per cluster (fractions)")
        fractions = [1.0]
    if len(fractions) != len(sizes):
        raise ValueError(f"{len(sizes)} clusters but {len(fractions)} fractions")
    output = 0.0
    for i, (size, share) in enumerate(zip(sizes, fractions)):
        d_emb = d_embed if div_val == 1 else d_embed // (div_val ** i)
        projected = div_val > 1 or d_embed != d
        rows = size + (len(cutoffs) if i == 0 else 0)
        weight = 1.0 if i == 0 else share                                       # the head scores every token
        output += weight * (rows * d_emb + (d * d_emb if projected else 0))
        if projected:   # the adaptive input: with div_val > 1 every cluster projects every token (static shapes)
            output += (1.0 if div_val > 1 else share) * d_emb * d
    return 6.0 * (n_layer * layer + output)


def mfu(tokens_per_s: float, flops_per_token: float, peak: Optional[float]) -> Optional[float]:
    return None if not peak else tokens_per_s * flops_per_token / peak
