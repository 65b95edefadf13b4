"""utils/model/flops.py: the FLOPs-per-token formula against PyTorch's own count of the matrix products that one
training step (forward and backward) runs, and MFU's arithmetic."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from mem_transformer import MemTransformerLM
from utils.model.flops import cluster_fractions, cluster_sizes, mfu, peak_flops, training_flops_per_token


def counted_flops_per_token(model_config: dict, bsz: int, fill_memory: bool) -> tuple[float, list]:
    """FLOPs of one forward + backward, counted by FlopCounterMode, per target token; and the tokens per
    cluster of the targets."""
    torch.manual_seed(0)
    model = MemTransformerLM(**model_config).train()
    n_token, tgt_len = model_config["n_token"], model_config["tgt_len"]
    # Zipf-like ids so that every tail cluster has tokens
    ranks = torch.distributions.Pareto(1.0, 0.8).sample((tgt_len + 1, bsz)).long() - 1
    data = ranks.clamp(max=n_token - 1)
    mems = None
    if fill_memory:
        with torch.no_grad():
            _, mems = model(data[:-1], data[1:], None)
    with FlopCounterMode(display=False) as counter:
        loss, _ = model(data[:-1], data[1:], mems)
        loss.float().mean().backward()
    bounds = [0] + list(model_config.get("cutoffs") or []) + [n_token]
    target = data[1:].flatten()
    counts = [int(((target >= lo) & (target < hi)).sum()) for lo, hi in zip(bounds, bounds[1:])]
    return counter.get_total_flops() / target.numel(), counts


BASE = dict(n_token=2000, n_layer=2, n_head=4, d_model=64, d_head=16, d_inner=256, tgt_len=16, mem_len=16,
            dropout=0.0, dropatt=0.0)


@pytest.mark.parametrize("name, extra", [
    ("full softmax", {}),
    ("adaptive, div_val 1", dict(cutoffs=[200, 800], div_val=1)),
    ("adaptive, div_val 2, projected", dict(cutoffs=[200, 800], div_val=2, d_embed=96)),
    ("absolute positions (type 2)", dict(attn_type=2)),
])
@pytest.mark.parametrize("fill_memory", [False, True], ids=["no memory yet", "full memory"])
def test_formula_matches_the_counted_matrix_products_of_a_training_step(name, extra, fill_memory):
    config = {**BASE, **extra}
    bsz = 64                    # r_net (once per segment, left out by the formula) is then well under 1%
    counted, counts = counted_flops_per_token(config, bsz, fill_memory)
    if not fill_memory:
        config = {**config, "mem_len": 0}       # the first segment attends to no memory
    fractions = cluster_fractions(counts) if config.get("cutoffs") else None
    formula = training_flops_per_token(config, fractions)
    assert formula == pytest.approx(counted, rel=0.02), (name, formula, counted)


def test_adaptive_softmax_needs_the_cluster_shares():
    with pytest.raises(ValueError, match="share of tokens"):
        training_flops_per_token({**BASE, "cutoffs": [200, 800]})
    with pytest.raises(ValueError, match="3 clusters but 2 fractions"):
        training_flops_per_token({**BASE, "cutoffs": [200, 800]}, [0.9, 0.1])


def test_cluster_sizes_fractions_and_mfu():
    assert cluster_sizes(267735, [19997, 39997, 199997]) == [19997, 20000, 160000, 67738]
    assert cluster_fractions([3, 1]) == [0.75, 0.25]
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("cpu") is None
    assert mfu(400_000, 700e6, 989e12) == pytest.approx(400_000 * 700e6 / 989e12)
    assert mfu(1000.0, 1e6, None) is None
