"""Reference checkpoints: the state-dict mapping (real fixture and hand-written reference names) and the
fixture's own perplexities."""
import json
import math

import pytest
import torch

from mem_transformer import MemTransformerLM
from model_testlib import spec_log_probs, tokens
from utils.io.errors import UserError
from utils.model.reference_compat import reference_state_dict_to_ours

FIXTURE = "fixtures/reference-checkpoint"


def load_fixture(shared_dir):
    from utils.io.checkpoint import load_checkpoint
    return load_checkpoint(shared_dir / FIXTURE / "ptb_tiny_attn0.pt")


def test_reference_fixture_loads_strictly(shared_dir):
    ck = load_fixture(shared_dir)
    model = MemTransformerLM(**ck["model_config"])
    model.load_state_dict(reference_state_dict_to_ours(ck["model_state"], ck["model_config"]), strict=True)
    assert torch.equal(model.word_emb.emb_layers[0].weight, ck["model_state"]["word_emb.emb_layers.0.weight"])
    assert torch.equal(model.layers[1].ff.fc2.bias, ck["model_state"]["layers.1.pos_ff.CoreNet.3.bias"])


def test_reference_fixture_gives_the_reference_perplexity_on_its_manual_texts(shared_dir, attn_impl):
    """expected.json: what the reference's eval.py printed for `--manual <words> --tgt_len T --mem_len M`
    (batch size 1, segments of T tokens carrying memory, tokens = Moses tokenization + <eos>)."""
    sacremoses = pytest.importorskip("sacremoses")
    ck = load_fixture(shared_dir)
    cases = json.loads((shared_dir / FIXTURE / "expected.json").read_text())["cases"]
    cases = [c for c in cases if c["args"].startswith("--manual ")]
    assert cases
    sym2idx = ck["vocab"]["sym2idx"]
    moses = sacremoses.MosesTokenizer("en")
    for case in cases:
        args = case["args"].split()
        opt = args.index("--tgt_len")
        tgt_len, mem_len = int(args[opt + 1]), int(args[args.index("--mem_len") + 1])
        text = moses.tokenize(" ".join(args[1:opt]), return_str=True).replace("&apos;", "'").replace("&quot;", '"')
        ids = torch.tensor([sym2idx.get(w, sym2idx["<unk>"]) for w in text.split()] + [sym2idx["<eos>"]])
        config = dict(ck["model_config"], tgt_len=tgt_len, mem_len=mem_len, ext_len=0)
        model = MemTransformerLM(**config)
        model.load_state_dict(reference_state_dict_to_ours(ck["model_state"], config), strict=True)
        model.set_attn_impl(attn_impl)
        model.eval()
        data, mems, total = ids.view(-1, 1), None, 0.0
        with torch.no_grad():
            for i in range(0, data.size(0) - 1, tgt_len):
                seq_len = min(tgt_len, data.size(0) - 1 - i)
                nll, mems = model(data[i:i + seq_len], data[i + 1:i + 1 + seq_len], mems)
                total += nll.sum().item()
        ppl = math.exp(total / (data.size(0) - 1))
        assert abs(ppl - case["ppl"]) < 2e-3, (case["args"], ppl)


def reference_state(tie_weight, n_layer=2, d=16, d_inner=24, n_head=2, d_head=8):
    """What the reference writes for n_token 40, cutoffs [10, 25], div_val 4, tie_projs [F, T, F] (§2.1),
    including `crit.shared_out_projs.*`, its registered alias of the embedding projections."""
    torch.manual_seed(7)
    shapes = {
        "word_emb.emb_layers.0.weight": (10, 16), "word_emb.emb_layers.1.weight": (15, 4),
        "word_emb.emb_layers.2.weight": (15, 1),
        "word_emb.emb_projs.0": (16, 16), "word_emb.emb_projs.1": (16, 4), "word_emb.emb_projs.2": (16, 1),
        "r_w_bias": (n_head, d_head), "r_r_bias": (n_head, d_head), "pos_emb.inv_freq": (d // 2,),
        "crit.cluster_weight": (2, 16), "crit.cluster_bias": (2,),
        "crit.out_layers_biases.0": (10,), "crit.out_layers_biases.1": (15,), "crit.out_layers_biases.2": (15,),
        "crit.out_projs.0": (16, 16), "crit.out_projs.2": (16, 1),
    }
    if not tie_weight:
        shapes.update({"crit.out_layers_weights.0": (10, 16), "crit.out_layers_weights.1": (15, 4),
                       "crit.out_layers_weights.2": (15, 1)})
    for layer in range(n_layer):
        p = f"layers.{layer}."
        shapes.update({p + "dec_attn.qkv_net.weight": (3 * n_head * d_head, d),
                       p + "dec_attn.r_net.weight": (n_head * d_head, d),
                       p + "dec_attn.o_net.weight": (d, n_head * d_head),
                       p + "dec_attn.layer_norm.weight": (d,), p + "dec_attn.layer_norm.bias": (d,),
                       p + "pos_ff.CoreNet.0.weight": (d_inner, d), p + "pos_ff.CoreNet.0.bias": (d_inner,),
                       p + "pos_ff.CoreNet.3.weight": (d, d_inner), p + "pos_ff.CoreNet.3.bias": (d,),
                       p + "pos_ff.layer_norm.weight": (d,), p + "pos_ff.layer_norm.bias": (d,)})
    state = {k: torch.randn(shape, dtype=torch.float64) * 0.3 for k, shape in shapes.items()}
    for i in range(3):
        state[f"crit.shared_out_projs.{i}"] = state[f"word_emb.emb_projs.{i}"]
    config = dict(n_token=40, n_layer=n_layer, n_head=n_head, d_model=d, d_head=d_head, d_inner=d_inner,
                  dropout=0.0, dropatt=0.0, dtype=None, tie_weight=tie_weight, d_embed=16, div_val=4,
                  tie_projs=[False, True, False], pre_lnorm=False, tgt_len=4, ext_len=0, mem_len=4,
                  cutoffs=[10, 25], same_length=False, attn_type=0, clamp_len=-1, sample_softmax=-1)
    return state, config


@pytest.mark.parametrize("tie_weight", [True, False])
def test_reference_names_for_adaptive_div_val_4_map_onto_the_same_computation(tie_weight):
    state, config = reference_state(tie_weight)
    model = MemTransformerLM(**config).double().eval()
    model.load_state_dict(reference_state_dict_to_ours(state, config), strict=True)

    # the output layer computes §2.7 with the reference's tensors: tied weights are the embedding tables,
    # tied projection 1 is word_emb.emb_projs.1, untied 0 and 2 are crit.out_projs.0 / .2
    src = "word_emb.emb_layers.{}.weight" if tie_weight else "crit.out_layers_weights.{}"
    weights = [state[src.format(i)] for i in range(3)]
    biases = [state[f"crit.out_layers_biases.{i}"] for i in range(3)]
    projs = [state["crit.out_projs.0"], state["word_emb.emb_projs.1"], state["crit.out_projs.2"]]
    h = torch.randn(3, 16, dtype=torch.float64)
    expected = spec_log_probs(h, [0, 10, 25, 40], weights, biases, projs, state["crit.cluster_weight"],
                              state["crit.cluster_bias"])
    got = model.crit.log_probs(h, model.word_emb.weights(), model.word_emb.projs())
    assert (got - expected).abs().max().item() < 1e-12

    # and the layers got the reference's tensors
    assert torch.equal(model.layers[1].attn.qkv_net.weight, state["layers.1.dec_attn.qkv_net.weight"])
    assert torch.equal(model.layers[0].ff.fc1.weight, state["layers.0.pos_ff.CoreNet.0.weight"])
    assert torch.equal(model.r_r_bias, state["r_r_bias"])
    data = tokens(5, 2, 40)
    assert torch.isfinite(model(data[:4], data[1:], None)[0]).all()


def test_reference_q_net_and_kv_net_become_one_qkv_net():
    state, config = reference_state(True, n_layer=1)
    config["attn_type"] = 2
    for name in ("r_w_bias", "r_r_bias", "layers.0.dec_attn.r_net.weight", "layers.0.dec_attn.qkv_net.weight"):
        del state[name]
    state["layers.0.dec_attn.q_net.weight"] = torch.randn(16, 16, dtype=torch.float64)
    state["layers.0.dec_attn.kv_net.weight"] = torch.randn(32, 16, dtype=torch.float64)
    ours = reference_state_dict_to_ours({"module." + k: v for k, v in state.items()}, config)   # DDP prefix
    model = MemTransformerLM(**config).double()
    model.load_state_dict(ours, strict=True)
    w = model.layers[0].attn.qkv_net.weight
    assert torch.equal(w[:16], state["layers.0.dec_attn.q_net.weight"])
    assert torch.equal(w[16:], state["layers.0.dec_attn.kv_net.weight"])      # k rows, then v rows


def test_unknown_or_inconsistent_reference_names_are_user_errors():
    state, config = reference_state(True)
    with pytest.raises(UserError, match="unknown parameter"):
        reference_state_dict_to_ours({**state, "decoder.weight": torch.zeros(1)}, config)
    with pytest.raises(UserError, match="tied or absent"):
        reference_state_dict_to_ours({**state, "crit.out_projs.1": torch.zeros(16, 4)}, config)
