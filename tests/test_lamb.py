"""LAMB: both implementations against a float64 element-by-element reference written from the formula."""
import io
import shutil
import math

import pytest
import torch

from lamb import Lamb

LR, BETAS, EPS = 0.05, (0.9, 0.999), 1e-6


class NaiveLamb:
    """The reference math on lists of Python floats (float64), one element at a time."""

    def __init__(self, params, weight_decays, adam=False):
        self.p = [[float(x) for x in t.flatten().tolist()] for t in params]
        self.wd = weight_decays
        self.adam = adam
        self.m = [[0.0] * len(p) for p in self.p]
        self.v = [[0.0] * len(p) for p in self.p]

    def step(self, grads):
        b1, b2 = BETAS
        for i, g in enumerate(grads):
            g = [float(x) for x in g.flatten().tolist()]
            p, m, v = self.p[i], self.m[i], self.v[i]
            u = []
            for j in range(len(p)):
                m[j] = b1 * m[j] + (1 - b1) * g[j]
                v[j] = b2 * v[j] + (1 - b2) * g[j] * g[j]
                u.append(m[j] / (math.sqrt(v[j]) + EPS) + self.wd[i] * p[j])
            w_norm = min(max(math.sqrt(sum(x * x for x in p)), 0.0), 10.0)
            u_norm = math.sqrt(sum(x * x for x in u))
            trust = 1.0 if (self.adam or w_norm == 0 or u_norm == 0) else w_norm / (u_norm + EPS)
            for j in range(len(p)):
                p[j] -= LR * trust * u[j]


def make_params():
    """Covers: plain tensors, a zero-norm tensor, a tensor with norm > 10, a tensor with zero gradient."""
    torch.manual_seed(0)
    return [
        torch.nn.Parameter(torch.randn(5, 4)),
        torch.nn.Parameter(torch.randn(7)),
        torch.nn.Parameter(torch.zeros(3, 3)),  # ||p|| == 0 -> trust 1
        torch.nn.Parameter(torch.full((4, 4), 5.0)),  # ||p|| = 20 -> clamped to 10
        torch.nn.Parameter(torch.randn(6)),  # zero gradient, no decay -> ||u|| == 0 -> trust 1
    ]


def grads_for(step, params):
    gen = torch.Generator().manual_seed(100 + step)
    grads = [torch.randn(p.shape, generator=gen) * (0.1 + i) for i, p in enumerate(params)]
    grads[4] = torch.zeros_like(params[4])
    return grads


def run_torch(fused, steps=5, adam=False):
    params = make_params()
    groups = [
        {"params": params[:4], "weight_decay": 0.01},
        {"params": params[4:], "weight_decay": 0.0},
    ]
    opt = Lamb(groups, lr=LR, betas=BETAS, eps=EPS, adam=adam, fused=fused)
    for step in range(steps):
        for p, g in zip(params, grads_for(step, params)):
            p.grad = g
        opt.step()
    return params, opt


@pytest.mark.parametrize("adam", [False, True])
@pytest.mark.parametrize("fused", [True, False])
def test_matches_naive_reference(fused, adam):
    params, _ = run_torch(fused, adam=adam)
    naive = NaiveLamb(make_params(), [0.01] * 4 + [0.0], adam=adam)
    ref_params = make_params()
    for step in range(5):
        naive.step(grads_for(step, ref_params))
    for got, want in zip(params, naive.p):
        torch.testing.assert_close(got.detach().flatten(), torch.tensor(want, dtype=torch.float32),
                                   rtol=1e-5, atol=1e-6)


def test_fused_and_eager_agree():
    fused, opt_f = run_torch(True)
    eager, opt_e = run_torch(False)
    for a, b in zip(fused, eager):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-8)
    for pa, pb in zip(fused, eager):
        torch.testing.assert_close(opt_f.state[pa]["exp_avg"], opt_e.state[pb]["exp_avg"])
        torch.testing.assert_close(opt_f.state[pa]["exp_avg_sq"], opt_e.state[pb]["exp_avg_sq"])
        assert opt_f.state[pa]["step"] == opt_e.state[pb]["step"] == 5


def test_trust_ratio_cases_change_params_as_expected():
    params, _ = run_torch(True, steps=1)
    # zero-norm param moves by lr * u with trust 1: first-step u = g/ (|g| + eps)  ~ sign(g)
    g = grads_for(0, make_params())[2]
    torch.testing.assert_close(params[2].detach(), -LR * (0.1 * g / (torch.sqrt(0.001 * g * g) + EPS)),
                               rtol=1e-5, atol=1e-7)
    # zero-gradient param without decay does not move
    torch.testing.assert_close(params[4].detach(), make_params()[4].detach())


@pytest.mark.parametrize("fused", [True, False])
def test_state_dict_round_trip_weights_only(fused):
    params, opt = run_torch(fused, steps=3)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)

    clone = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt2 = Lamb([{"params": clone[:4], "weight_decay": 0.01}, {"params": clone[4:], "weight_decay": 0.0}],
                lr=LR, fused=fused)
    opt2.load_state_dict(state)
    assert opt2.state[clone[0]]["step"] == 3
    for step in range(3, 5):
        for plist in (params, clone):
            for p, g in zip(plist, grads_for(step, plist)):
                p.grad = g
        opt.step()
        opt2.step()
    for a, b in zip(params, clone):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("fused", [True, False])
def test_sparse_gradients_are_rejected(fused):
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = Lamb(emb.parameters(), fused=fused)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()


def test_params_without_grad_are_skipped_and_closure_is_called():
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    opt = Lamb([a, b], lr=0.1)

    def closure():
        loss = (a * 2).sum()
        loss.backward()
        return loss

    assert opt.step(closure).item() == 6.0
    assert b not in opt.state and opt.state[a]["step"] == 1
    torch.testing.assert_close(b.detach(), torch.ones(3))


def test_invalid_hyperparameters():
    p = [torch.nn.Parameter(torch.ones(1))]
    for kwargs in ({"lr": -1}, {"eps": -1}, {"betas": (1.0, 0.9)}, {"betas": (0.9, -0.1)}, {"weight_decay": -1}):
        with pytest.raises(ValueError):
            Lamb(p, **kwargs)


def test_fused_step_never_reads_values_back_to_the_host():
    # meta tensors have no data: any .item() / bool() on a result (a device->host sync on CUDA) would raise
    params = [torch.nn.Parameter(torch.empty(4, 3, device="meta")), torch.nn.Parameter(torch.empty(5, device="meta"))]
    for p in params:
        p.grad = torch.empty_like(p)
    Lamb(params, lr=0.1, weight_decay=0.01, fused=True).step()
    with pytest.raises(RuntimeError, match="meta"):
        Lamb(params, lr=0.1, fused=False).step()  # the per-tensor loop branches on the norms


@pytest.mark.slow
@pytest.mark.parametrize("adam,clip", [(False, False), (True, False), (False, True)])
def test_compiled_step_matches_the_eager_step_and_compiles_once_while_the_lr_changes(adam, clip):
    from torch._dynamo.utils import counters
    if not any(shutil.which(cc) for cc in ("g++", "c++", "clang++")):
        pytest.skip("no C++ compiler on PATH: torch.compile's CPU backend (inductor) cannot build kernels")
    results = []
    for compile in (False, True):
        params = make_params()
        opt = Lamb(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=0.01, adam=adam, compile=compile)
        graphs_before = counters["stats"]["unique_graphs"]
        for step in range(4):
            opt.param_groups[0]["lr"] = LR * (4 - step) / 4                  # a schedule: new value every step
            for p, g in zip(params, grads_for(step, params)):
                p.grad = g
            if clip:                                        # TrainStep's clipping factor, a new value each step
                opt.clip_coef = torch.tensor(0.9 - 0.2 * step)
            opt.step()
        if compile:
            assert counters["stats"]["unique_graphs"] - graphs_before == 1
        results.append(params)
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-7)


# ---- issue 18: the GradScaler's found_inf and the clip factor on the device ---------------------------------

def _fp16_like_step(found_inf, clip_coef=None, adam=False):
    params = make_params()
    opt = Lamb(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=0.01, adam=adam, fused=True)
    for step in range(3):
        grads = grads_for(step, params)
        if step == 2 and found_inf:
            grads[1][3] = float("inf")
        for p, g in zip(params, grads):
            p.grad = g
        if step == 2:
            opt.found_inf = torch.tensor(1.0 if found_inf else 0.0)
            opt.grad_scale = None
            opt.clip_coef = clip_coef
        opt.step()
    return params, opt


@pytest.mark.parametrize("adam", [False, True])
def test_found_inf_on_the_device_skips_exactly_and_otherwise_changes_nothing(adam):
    skipped, opt_s = _fp16_like_step(True, adam=adam)
    ran, opt_r = _fp16_like_step(False, adam=adam)
    two_steps = make_params()                        # what the skipped run must equal: the state after step 2
    opt = Lamb(two_steps, lr=LR, betas=BETAS, eps=EPS, weight_decay=0.01, adam=adam, fused=True)
    plain = make_params()                            # what the not-skipped run must equal: no scaler at all
    opt_p = Lamb(plain, lr=LR, betas=BETAS, eps=EPS, weight_decay=0.01, adam=adam, fused=True)
    for step in range(3):
        for plist, o in ((two_steps, opt), (plain, opt_p)):
            if plist is two_steps and step == 2:
                continue
            for p, g in zip(plist, grads_for(step, plist)):
                p.grad = g
            o.step()
    for a, b in zip(skipped, two_steps):
        assert torch.equal(a, b)
        assert torch.equal(opt_s.state[a]["exp_avg"], opt.state[b]["exp_avg"])
        assert torch.equal(opt_s.state[a]["exp_avg_sq"], opt.state[b]["exp_avg_sq"])
    for a, b in zip(ran, plain):
        assert torch.equal(a, b)


def test_the_clip_factor_inside_the_update_equals_clip_grad_norm_then_step():
    params = make_params()
    ref = make_params()
    opt = Lamb(params, lr=LR, weight_decay=0.01)
    opt_ref = Lamb(ref, lr=LR, weight_decay=0.01)
    for step in range(3):
        for plist in (params, ref):
            for p, g in zip(plist, grads_for(step, plist)):
                p.grad = g * 3
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        opt.clip_coef = torch.clamp(0.25 / (norm + 1e-6), max=1.0)
        opt.step()
        torch.nn.utils.clip_grad_norm_(ref, 0.25)
        opt_ref.step()
    for a, b in zip(params, ref):
        assert torch.equal(a, b)
    assert opt.clip_coef is None                     # for one step only


@pytest.mark.parametrize("adam, clip, streams", [(False, None, 1), (False, 0.3, 1), (True, 0.3, 1), (False, None, 2),
                                                  (False, 0.3, 2), (True, 0.3, 2)])
def test_the_blocked_cpu_step_equals_the_multi_tensor_update_bit_for_bit(monkeypatch, adam, clip, streams):
    """The eager CPU step runs the update block by block (lamb._lamb_blocked), in one Python thread or shared by
    two (streams); the multi-tensor update (lamb._lamb_multi_tensor, what runs on a GPU) is the
    second code path. Blocks of 64 elements so that the tensors here span several blocks, one of them partial."""
    from utils.training import lamb as lamb_module
    monkeypatch.setattr(lamb_module, "_BLOCK", 64)
    submitted = []
    pool = lamb_module._second_stream()

    class CountingPool:
        def submit(self, fn, *args):
            submitted.append(args[0])
            return pool.submit(fn, *args)
    monkeypatch.setattr(lamb_module, "_second_stream", lambda: CountingPool())
    torch.manual_seed(1)
    shapes = [(37, 11), (300,), (5,), (64,), (3, 3)]
    tensors = [[torch.randn(s) for s in shapes] for _ in range(4)]
    tensors[3] = [t.abs() * 1e-3 for t in tensors[3]]                     # second moments are >= 0
    ours, theirs = ([[t.clone() for t in ts] for ts in tensors] for _ in range(2))
    kwargs = dict(lr=0.05, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.01, adam=adam,
                  clip_coef=None if clip is None else torch.tensor(clip))
    buffers = [torch.empty(s) for s in shapes]
    for _ in range(2):                                                     # the buffers are reused
        ours[1], theirs[1] = [g.clone() for g in tensors[1]], [g.clone() for g in tensors[1]]   # fresh gradients
        got = lamb_module._lamb_blocked(*ours, buffers=buffers, streams=streams, **kwargs)
        want = lamb_module._lamb_multi_tensor(*theirs, **kwargs)
    # two streams: the directions, the parameters' norms (not with adam) and the updates went to the second one
    assert len(submitted) == (0 if streams == 1 else 2 * (2 if adam else 3))
    assert (got is None) == (want is None) and (got is None or torch.equal(got, want))
    for which in (0, 2, 3):                                                # parameters and both moments
        for x, y in zip(ours[which], theirs[which]):
            assert torch.equal(x, y)
    for x, y in zip(ours[1], tensors[1]):                                  # the gradients are left as they were
        assert torch.equal(x, y)


def test_the_eager_cpu_step_keeps_one_update_buffer_per_parameter_between_steps():
    params, opt = run_torch(True, steps=2)
    buffers = dict(opt._update_buffers)
    assert set(buffers) == set(params)
    for p in params:
        p.grad = torch.ones_like(p)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        opt.step()                                                     # runs on one thread ...
        assert torch.get_num_threads() == 2                            # ... and gives the other back
    finally:
        torch.set_num_threads(threads)
    assert all(opt._update_buffers[p] is buffers[p] for p in params)   # reused, not reallocated
    assert "update" not in str(opt.state_dict())                       # not part of the saved state
