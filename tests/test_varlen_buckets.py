"""--varlen with --compile pads segments to bucket lengths (utils/model/varlen_padding.py): the padded run gives
the unpadded run's losses, memories and gradients (truth: the same model without padding), and a compiled
varlen run compiles one graph per bucket (segments before the memory is full and longer than every bucket run
uncompiled)."""
import pytest
import torch

from model_testlib import tiny_model, tokens
from numerics import assert_rounding_close
from utils.model.varlen_padding import BucketPadding, bucket_for, default_buckets

LENGTHS = [6, 5, 7, 3, 6, 8, 2, 6]          # segment lengths of a varlen stream


def segments(lengths, bsz=3, n_token=40):
    data = tokens(sum(lengths) + 1, bsz, n_token, seed=4)
    pos = 0
    for n in lengths:
        yield data[pos:pos + n], data[pos + 1:pos + n + 1]
        pos += n


def run(model, forward, lengths):
    """Per segment: the loss, the new memory, the gradients of the loss."""
    mems, out = None, []
    for data, target in segments(lengths):
        nll, mems = forward(data, target, mems)
        loss = nll.mean()
        grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad], allow_unused=True)
        out.append((loss.detach(), mems, grads))
    return out


@pytest.mark.parametrize("attn_type, options", [
    (0, {}), (0, {"same_length": True, "clamp_len": 3}), (1, {"same_length": True})],
    ids=["type0", "type0_same_length_clamp", "type1_same_length"])
def test_padding_to_buckets_gives_the_unpadded_losses_memories_and_gradients(attn_type, options):
    model = tiny_model(attn_type, tgt_len=6, mem_len=4, **options).train()
    expected = run(model, model, LENGTHS)
    model.varlen_padding = True
    padded_calls = []

    def forward(data, target, mems):
        padded_calls.append(mems is not None and bucket_for(target.size(0), [4, 8]) > target.size(0))
        return BucketPadding(model, [4, 8], model.mem_len)(data, target, mems)

    got = run(model, forward, LENGTHS)
    assert sum(padded_calls) >= 4                                  # most segments were really padded
    for step, ((loss, mems, grads), (loss_e, mems_e, grads_e)) in enumerate(zip(got, expected)):
        assert_rounding_close(loss, loss_e, f"loss {step}")
        assert_rounding_close(mems, mems_e, f"memory {step}")
        for g, g_e in zip(grads, grads_e):
            if g_e is not None:
                assert_rounding_close(g, g_e, f"gradient {step}")


@pytest.mark.parametrize("tgt_len, overhead", [(64, 0.08), (192, 0.03)])
def test_default_buckets_cover_every_varlen_length_with_little_padding(tgt_len, overhead):
    """The lengths the iterator draws (its own rule) all fit a bucket; the padded positions are a few percent
    (docs/gpu_step.md: 6.7% for tgt_len 64, 2.2% for 192, over 20,000 draws)."""
    from data_utils import LMOrderedIterator
    it = LMOrderedIterator(torch.zeros(10 * tgt_len, dtype=torch.long), 2, tgt_len, varlen=True, seed=1111)
    buckets = default_buckets(tgt_len)
    lengths = [it.varlen_bptt(i) for i in range(3000)]
    assert len(buckets) <= 6 and all(bucket_for(n, buckets) in buckets for n in lengths)
    padded = sum(bucket_for(n, buckets) for n in lengths)
    assert padded / sum(lengths) - 1 < overhead


def test_a_compiled_varlen_run_compiles_once_per_bucket_and_matches_the_eager_run():
    """aot_eager (no code generation): the graph count is dynamo's, as with inductor."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    from utils.model import varlen_padding

    class Args:
        tgt_len, varlen_buckets = 6, [4, 8]

    lengths = [7, 5, 6, 3, 8, 6, 2, 11, 7, 4, 6]                # 11: longer than every bucket
    model = tiny_model(0, tgt_len=6, mem_len=4, same_length=True).train()
    expected = run(model, model, lengths)
    torch._dynamo.reset()
    counters.clear()
    config = torch._dynamo.config
    with config.patch(recompile_limit=config.recompile_limit, fail_on_recompile_limit_hit=False):  # restored after
        forward = varlen_padding.enable(model, torch.compile(model, backend="aot_eager", dynamic=False), Args)
        assert config.fail_on_recompile_limit_hit                  # never a silent eager fallback
        got = run(model, forward, lengths)
    graphs = counters["stats"]["unique_graphs"]
    model.varlen_padding = False
    torch._dynamo.reset()
    for (loss, mems, _), (loss_e, mems_e, _) in zip(got, expected):
        assert_rounding_close(loss, loss_e, "loss")
        assert_rounding_close(mems, mems_e, "memory")
    # the memory-less first segment and the 11 run uncompiled (7 >= mem_len: full memory from the second): one
    # graph per bucket
    assert graphs == 2, graphs


def test_attention_types_that_are_not_padded_run_uncompiled_with_a_warning(caplog):
    """Types 2 and 3 (absolute positions would move): every length would be a graph of its own, so enable
    returns the uncompiled model and says so (no run that stops at dynamo's recompile limit)."""
    from utils.model import varlen_padding

    class Args:
        tgt_len, varlen_buckets = 6, [4, 8]

    model = tiny_model(2, tgt_len=6, mem_len=4)
    compiled = object()                                         # never called
    with caplog.at_level("WARNING", logger="txl"):
        assert varlen_padding.enable(model, compiled, Args) is model
    assert "runs uncompiled" in caplog.text and not model.varlen_padding
