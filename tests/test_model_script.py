"""One model definition for eager, TorchScript and torch.compile."""
import io
import shutil

import pytest
import torch

from model_testlib import tiny_model, tokens

pytestmark = [pytest.mark.filterwarnings("ignore:.*torch.jit.*deprecated:DeprecationWarning"),
              pytest.mark.usefixtures("attn_impl")]      # every test for each attention implementation


@pytest.mark.parametrize("attn_type", [0, 1, 2, 3])
def test_scripted_model_computes_what_the_eager_model_computes(attn_type):
    model = tiny_model(attn_type, cutoffs=[10, 25], div_val=2, d_embed=12, tie_projs=[False, True, False],
                       tgt_len=5, mem_len=4, clamp_len=3, same_length=True)
    scripted = torch.jit.script(model)
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    data = tokens(16, 3, 40)
    mems = mems_s = model.init_mems(3)
    assert torch.equal(scripted.init_mems(3), mems)
    for s in (0, 5, 10):
        nll, mems_next = model(data[s:s + 5], data[s + 1:s + 6], mems)
        for m in (scripted, loaded):
            nll_s, mems_s_next = m(data[s:s + 5], data[s + 1:s + 6], mems_s)
            assert (nll - nll_s).abs().max().item() < 1e-12
            assert (mems_next - mems_s_next).abs().max().item() < 1e-12
        logp, _ = model.next_token_logprobs(data[s:s + 1], mems)
        logp_s, _ = scripted.next_token_logprobs(data[s:s + 1], mems_s)
        assert (logp - logp_s).abs().max().item() < 1e-12
        mems, mems_s = mems_next, mems_s_next
    scripted.reset_length(3, 0, 2)
    assert scripted.mem_len == 2


@pytest.mark.slow
def test_compiled_model_computes_what_the_eager_model_computes():
    if not any(shutil.which(cc) for cc in ("g++", "c++", "clang++")):
        pytest.skip("no C++ compiler on PATH: torch.compile's CPU backend (inductor) cannot build kernels")
    model = tiny_model(0, n_layer=1, dtype=torch.float32, tgt_len=6, mem_len=6, clamp_len=4)
    data = tokens(13, 2, 40)
    with torch.no_grad():
        _, mems = model(data[:6], data[1:7], None)
        expected, expected_mems = model(data[6:12], data[7:13], mems)
        nll, new_mems = torch.compile(model, dynamic=False)(data[6:12], data[7:13], mems)
    assert (nll - expected).abs().max().item() < 1e-4
    assert (new_mems - expected_mems).abs().max().item() < 1e-4
