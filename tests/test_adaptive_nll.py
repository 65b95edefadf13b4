"""Issue 18: the adaptive-softmax NLL with static shapes (fixed-capacity tail gathers) and one gradient buffer
for the shared table, against an independent path: autograd through the crit's own log_probs (full
log-softmax, cluster by cluster, float64); and the compiled model without graph breaks."""
import pytest
import torch
from torch._dynamo.utils import counters
from torch.utils._python_dispatch import TorchDispatchMode

from mem_transformer import MemTransformerLM
from utils.model.adaptive_softmax import ProjectedAdaptiveLogSoftmax

N_TOKEN, CUTOFFS = 60, [20, 30, 45]


def crit_and_params(div_val, tie, d_embed=8, d_proj=6, seed=0):
    torch.manual_seed(seed)
    crit = ProjectedAdaptiveLogSoftmax(N_TOKEN, d_embed, d_proj, CUTOFFS, div_val=div_val,
                                       tie_projs=[False, True, False, True], tie_weight=tie).double()
    if div_val == 1:
        emb_w = [torch.nn.Parameter(torch.randn(N_TOKEN, d_embed, dtype=torch.float64))]
        emb_p = [torch.nn.Parameter(torch.randn(d_proj, d_embed, dtype=torch.float64))]
    else:
        bounds = [0] + CUTOFFS + [N_TOKEN]
        emb_w = [torch.nn.Parameter(torch.randn(bounds[i + 1] - bounds[i], d_embed // div_val ** i,
                                                dtype=torch.float64)) for i in range(4)]
        emb_p = [torch.nn.Parameter(torch.randn(d_proj, d_embed // div_val ** i, dtype=torch.float64))
                 for i in range(4)]
    with torch.no_grad():
        for p in crit.parameters():
            p.copy_(torch.randn_like(p))
    return crit, emb_w, emb_p


def loss_and_grads(crit, emb_w, emb_p, hidden, target, reference=False):
    params = list(crit.parameters()) + emb_w + emb_p
    for p in params:
        p.grad = None
    h = hidden.clone().requires_grad_()
    if reference:                    # autograd through the full log-probabilities
        nll = -crit.log_probs(h, emb_w, emb_p).gather(1, target.unsqueeze(1)).squeeze(1)
    else:
        nll = crit(h, target, emb_w, emb_p)
    weights = torch.linspace(0.5, 1.5, nll.numel(), dtype=nll.dtype)          # a non-uniform upstream gradient
    (nll * weights).sum().backward()
    return nll.detach(), [h.grad] + [torch.zeros_like(p) if p.grad is None else p.grad for p in params]


@pytest.mark.parametrize("capacity", [None, 1.0, 0.5])
@pytest.mark.parametrize("div_val, tie", [(1, True), (1, False), (2, True), (2, False)])
def test_static_adaptive_nll_and_gradients_match_autograd_through_the_full_log_softmax(div_val, tie, capacity):
    crit, emb_w, emb_p = crit_and_params(div_val, tie)
    crit.tail_capacity = capacity
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(24, 6, dtype=torch.float64, generator=g)
    # every cluster present, none over half of the tokens (capacity 0.5 is then exact)
    target = torch.tensor([0, 5, 19, 20, 25, 29, 30, 40, 44, 45, 50, 59] * 2)
    target = target[torch.randperm(24, generator=g)]
    nll, grads = loss_and_grads(crit, emb_w, emb_p, hidden, target)
    ref_nll, ref_grads = loss_and_grads(crit, emb_w, emb_p, hidden, target, reference=True)
    torch.testing.assert_close(nll, ref_nll, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("div_val", [1, 2])
def test_tokens_over_the_capacity_get_nan_and_the_others_stay_exact(div_val):
    crit, emb_w, emb_p = crit_and_params(div_val, True)
    hidden = torch.randn(10, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    target = torch.tensor([1, 50, 51, 2, 52, 53, 3, 25, 54, 4])       # 5 tokens of cluster 3 (ids 45..59)
    crit.tail_capacity = 0.3                                         # 3 rows per tail cluster
    nll = crit(hidden, target, emb_w, emb_p)
    crit.tail_capacity = None
    exact = crit(hidden, target, emb_w, emb_p)
    in_cluster_3 = [1, 2, 4, 5, 8]                                    # stable order: the last 2 overflow
    assert torch.isnan(nll[[5, 8]]).all()
    keep = [i for i in range(10) if i not in (5, 8)]
    torch.testing.assert_close(nll[keep], exact[keep], rtol=1e-12, atol=1e-12)
    assert torch.isfinite(exact).all() and len(in_cluster_3) == 5


class TableSizedOutputs(TorchDispatchMode):
    """The ops that produce a tensor of the table's shape (full-size gradient buffers)."""

    def __init__(self, shape):
        super().__init__()
        self.shape, self.ops = tuple(shape), []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and tuple(out.shape) == self.shape and not func.is_view:
            self.ops.append(str(func.overloadpacket.__name__))
        return out


def test_tied_div_val_1_table_gets_one_gradient_buffer_from_the_output_layer():
    torch.manual_seed(0)
    model = MemTransformerLM(N_TOKEN, 1, 2, 8, 4, 16, 0.0, 0.0, tie_weight=True, cutoffs=CUTOFFS,
                             tgt_len=6, mem_len=0)
    data = torch.randint(0, N_TOKEN, (6, 4))
    loss, _ = model(data, torch.randint(0, N_TOKEN, (6, 4)), None)
    table = model.word_emb.emb_layers[0].weight
    with TableSizedOutputs(table.shape) as seen:
        loss.mean().backward()
    # the output layer's one buffer, into which the embedding adds its rows (utils/model/shared_table_grad.py);
    # autograd through row slices gave one zero-filled table-sized tensor per cluster (4) and their sums, and
    # the embedding's backward its own zero-filled table plus one more sum
    allocated = [op for op in seen.ops if not op.endswith("_")]            # in-place ops return the buffer
    assert allocated == ["empty"], seen.ops
    assert "slice_backward" not in seen.ops and "zeros" not in seen.ops and "new_zeros" not in seen.ops
    assert "embedding_dense_backward" not in seen.ops
    assert table.grad.shape == table.shape


def test_the_tied_table_gradient_equals_autograd_sum_of_embedding_and_output_layer_bit_for_bit(monkeypatch):
    """Second code path: the embedding's own backward (F.embedding) plus autograd's sum of the two tables."""
    from utils.model import shared_table_grad
    torch.manual_seed(0)
    model = MemTransformerLM(N_TOKEN, 2, 2, 8, 4, 16, 0.0, 0.0, tie_weight=True, cutoffs=CUTOFFS,
                             tgt_len=12, mem_len=0)
    data = torch.randint(0, 8, (12, 4))                  # many repeated tokens: sums of several rows
    data[::3] = torch.randint(0, N_TOKEN, (4, 4))
    target = torch.randint(0, N_TOKEN, (12, 4))

    def grads():
        model.zero_grad(set_to_none=True)
        loss, _ = model(data, target, None)
        loss.mean().backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    ours = grads()
    monkeypatch.setattr(shared_table_grad, "_usable", lambda weight: False)   # plain F.embedding
    plain = grads()
    assert ours.keys() == plain.keys()
    for name in plain:
        assert torch.equal(ours[name], plain[name]), name


def _steps_of_a_tied_model(n_steps, keep_alias=None):
    """Parameters after n_steps TrainSteps of a tied adaptive-softmax model, and each step's table-gradient
    address; keep_alias "view" / "tensor": a view of each step's table gradient, or the gradient tensor itself,
    is kept (and returned with its values)."""
    import contextlib
    from lamb import Lamb
    from utils.training.train_step import TrainStep
    torch.manual_seed(0)
    model = MemTransformerLM(N_TOKEN, 2, 2, 8, 4, 16, 0.0, 0.0, tie_weight=True, cutoffs=CUTOFFS,
                             tgt_len=6, mem_len=6)
    step = TrainStep(model, model, Lamb(model.parameters(), lr=0.01), torch.amp.GradScaler("cpu", enabled=False),
                     contextlib.nullcontext, clip=0.25)
    table = model.word_emb.emb_layers[0].weight
    stream = torch.randint(0, N_TOKEN, (6 * n_steps + 1, 4), generator=torch.Generator().manual_seed(1))
    mems, addresses, aliases = [None], [], []
    for i in range(n_steps):
        step.run(stream[6 * i: 6 * i + 6], stream[6 * i + 1: 6 * i + 7], mems)
        addresses.append(table.grad.data_ptr())
        if keep_alias:                                  # a view of it, or the tensor itself
            kept = table.grad[1:] if keep_alias == "view" else table.grad
            aliases.append((kept, kept.clone()))
    return [p.detach().clone() for p in model.parameters()], addresses, aliases


def test_the_table_gradients_memory_is_reused_between_steps_with_the_same_results(monkeypatch):
    """The output layer writes every element of the table gradient, so last step's memory serves again (no
    fresh 274 MB of page faults per WikiText-103 step); second code path: a new buffer every step."""
    from utils.model import shared_table_grad
    reused, addresses, _ = _steps_of_a_tied_model(4)
    assert len(set(addresses)) == 1, addresses
    with monkeypatch.context() as m:
        m.setattr(shared_table_grad, "keep_for_reuse", lambda params: None)
        fresh, _, _ = _steps_of_a_tied_model(4)
    for a, b in zip(reused, fresh):
        assert torch.equal(a, b)
    # a gradient that something else still views or holds is not overwritten
    for keep in ("view", "tensor"):
        _, _, aliases = _steps_of_a_tied_model(3, keep_alias=keep)
        for kept, values in aliases:
            assert torch.equal(kept, values), keep


def test_compiled_on_the_cpu_the_tied_lookup_still_adds_into_the_output_layers_buffer(monkeypatch):
    """Default (exact-size) softmax under torch.compile: the output layer runs eagerly, and so does the tied
    lookup (`embed_outside_the_graph`), whose rows then go into the output layer's buffer, as uncompiled. Second
    code path: the eager model with the plain F.embedding lookup."""
    from utils.model import shared_table_grad
    handed_over = []
    real_sums = shared_table_grad.first_occurrence_sums
    monkeypatch.setattr(shared_table_grad, "first_occurrence_sums",
                        lambda tokens, grad: handed_over.append(1) or real_sums(tokens, grad))
    data, target = torch.randint(0, 200, (8, 4)), torch.randint(0, 200, (8, 4))
    mems = torch.zeros(2, 8, 4, 16)

    def grads(model, forward):
        model.zero_grad(set_to_none=True)
        loss, _ = forward(data, target, mems)
        loss.float().mean().backward()
        return {name: p.grad for name, p in model.named_parameters()}

    torch._dynamo.reset()
    model = small_model(0, 1, True).eval()                             # no dropout: both runs see the same model
    compiled = grads(model, torch.compile(model, dynamic=False, backend="aot_eager"))
    assert len(handed_over) == 1
    with monkeypatch.context() as m:
        m.setattr(shared_table_grad, "_usable", lambda weight: False)
        plain = grads(model, model)
    assert compiled.keys() == plain.keys()
    for name in plain:
        torch.testing.assert_close(compiled[name], plain[name], rtol=1e-6, atol=1e-7, msg=name)
    breaks = torch._dynamo.explain(model)(data, target, mems).break_reasons
    assert any("disable" in str(r.reason) for r in breaks), [str(r.reason)[:120] for r in breaks]


# (attn_type, div_val, tie_weight): every attention type, div_val 1 and 4, tied and untied
CONFIGS = [(0, 1, True), (0, 4, False), (1, 1, False), (1, 4, True), (2, 1, True), (2, 4, False),
           (3, 1, False), (3, 4, True)]


def small_model(attn_type, div_val, tie):
    torch.manual_seed(0)
    return MemTransformerLM(200, 2, 2, 16, 8, 32, 0.1, 0.0, tie_weight=tie, div_val=div_val, cutoffs=[50, 100],
                            tie_projs=[False, True, True], tgt_len=8, mem_len=8, attn_type=attn_type,
                            d_embed=16).train()


@pytest.mark.parametrize("attn_type, div_val, tie", CONFIGS)
def test_the_training_forward_has_no_graph_break(attn_type, div_val, tie):
    model = small_model(attn_type, div_val, tie)
    model.crit.tail_capacity = 0.5

    def loss_of(data, target, mems):
        loss, new_mems = model(data, target, mems)
        return loss.float().mean(), new_mems
    torch._dynamo.reset()
    explained = torch._dynamo.explain(loss_of)(torch.randint(0, 200, (8, 4)), torch.randint(0, 200, (8, 4)),
                                               torch.zeros(2, 8, 4, 16))
    assert explained.graph_break_count == 0, [str(r.reason)[:200] for r in explained.break_reasons]
    assert explained.graph_count == 1


@pytest.mark.slow
def test_a_30_step_compiled_run_compiles_twice_and_matches_eager():
    """fullgraph=True (a graph break would raise); graphs: the memory-less first step and the rest.
    Backend aot_eager: dynamo + AOT autograd (forward and backward graphs) without inductor's C++ builds."""
    from lamb import Lamb
    from utils.training.train_step import TrainStep
    import contextlib
    stream = torch.randint(0, 200, (8 * 31 + 1, 4), generator=torch.Generator().manual_seed(0))
    losses = []
    for compiled in (False, True):
        model = small_model(0, 1, True)
        model.crit.tail_capacity = 1.0
        torch._dynamo.reset()
        graphs_before = counters["stats"]["unique_graphs"]
        forward = torch.compile(model, fullgraph=True, dynamic=False, backend="aot_eager") if compiled else model
        step = TrainStep(model, forward, Lamb(model.parameters(), lr=0.01), torch.amp.GradScaler("cpu", enabled=False),
                         contextlib.nullcontext, clip=0.25)
        mems, run = [None], []
        for i in range(30):
            loss, _ = step.run(stream[8 * i: 8 * i + 8], stream[8 * i + 1: 8 * i + 9], mems)
            run.append(loss)
        losses.append(torch.stack(run))
        if compiled:
            assert counters["stats"]["unique_graphs"] - graphs_before == 2
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-4, atol=1e-5)


def test_compiled_the_shared_table_loss_writes_no_slices_of_a_shared_logits_buffer():
    """Under torch.compile each cluster's logits get their own tensor: a write into a slice of one shared buffer
    becomes a copy of the whole buffer in the graph (slice_scatter), which made the compiled loss several times
    slower and larger in memory. The forward graph (aot) of a bf16 tied loss with a tail capacity has none."""
    from torch._dynamo.backends.common import aot_autograd
    forward_graphs = []

    def keep_forward(gm, example_inputs):
        forward_graphs.append(gm)
        return gm.forward

    backend = aot_autograd(fw_compiler=keep_forward, bw_compiler=lambda gm, example_inputs: gm.forward)
    crit, emb_w, emb_p = crit_and_params(1, True)
    crit, emb_w = crit.float(), [torch.nn.Parameter(emb_w[0].detach().float())]
    crit.tail_capacity = 1.0
    hidden = torch.randn(64, 6, requires_grad=True)
    target = torch.randint(0, N_TOKEN, (64,))

    def loss(h, t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return crit(h, t, emb_w, [p.float() for p in emb_p]).float().sum()
    torch._dynamo.reset()
    compiled = torch.compile(loss, backend=backend, fullgraph=True)(hidden, target)
    compiled.backward()
    torch.testing.assert_close(compiled, loss(hidden, target))
    assert len(forward_graphs) == 1
    scatters = [tuple(node.meta["val"].shape) for node in forward_graphs[0].graph.nodes
                if node.op == "call_function" and "slice_scatter" in str(node.target)]
    assert not scatters, scatters
