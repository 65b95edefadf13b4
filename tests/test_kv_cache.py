"""Issue 18: generation with a key/value cache of the memory gives what recomputing the memory's keys and
values every step gives (the model's own next_token_logprobs), token for token."""
import pytest
import torch

from inference.generation import generate
from inference.kv_cache import MemoryKVCache, supports
from inference_testlib import one_thread  # noqa: F401  (autouse: one thread per test module)
from model_testlib import tiny_model, tokens

pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.*deprecated:DeprecationWarning")


@pytest.mark.parametrize("attn_type, pre_lnorm, same_length, div_val", [
    (0, False, False, 1), (0, True, True, 2), (1, False, True, 1), (1, True, False, 2)])
def test_cached_generation_equals_recomputation(attn_type, pre_lnorm, same_length, div_val):
    model = tiny_model(attn_type, n_layer=3, tgt_len=4, mem_len=7, clamp_len=5, same_length=same_length,
                       pre_lnorm=pre_lnorm, div_val=div_val, cutoffs=[20, 30], d_embed=16)
    prompt = tokens(13, 1, 40, seed=7)[:, 0].tolist()
    runs = []
    for kv_cache in (False, True):
        runs.append(list(generate(model, prompt, 15, 3, temperature=1.3, generator=torch.Generator().manual_seed(2),
                                  kv_cache=kv_cache)))
    for plain, cached in zip(*runs):
        assert torch.equal(plain.tokens, cached.tokens)
        torch.testing.assert_close(cached.logprobs, plain.logprobs, rtol=0, atol=1e-12)   # float64 model


def test_a_cached_step_projects_only_the_new_token():
    """The memory's rows never go through qkv_net again after the cache is filled."""
    model = tiny_model(0, n_layer=2, tgt_len=4, mem_len=6)
    mems = model.init_mems(2)
    data = tokens(8, 2, 40)
    _, mems = model.next_token_logprobs(data, mems)                         # a full memory of 6 rows
    model.reset_length(1, 0, 6)
    cache = MemoryKVCache(model)
    cache.fill(mems)
    rows = []
    original = torch.nn.functional.linear

    def spy(x, w, b=None):
        if w.size(0) == 3 * model.n_head * model.d_head or w.size(0) == 2 * model.n_head * model.d_head:
            rows.append(x.numel() // x.size(-1))
        return original(x, w, b)
    torch.nn.functional.linear = spy
    try:
        cache.step(tokens(1, 2, 40, seed=3), mems)
    finally:
        torch.nn.functional.linear = original
    assert rows == [2, 2]                          # one token per sample, per layer
    assert supports(model) and not supports(tiny_model(2))
