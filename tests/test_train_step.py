"""The shared training step: gradient accumulation over chunks equals one pass, memory carried per chunk,
fp16 loss scaling skips and counts overflowing steps, float32 master weights under autocast; the speed flags
(resolution per device, checks) and the benchmark script end to end."""
import json
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from lamb import Lamb
from model_testlib import tiny_model, tokens
from utils.config.cli import parse_args, train_parser
from utils.io.errors import UserError
from utils.runtime.device import amp_context, grad_scaler, resolve_speed_flags
from utils.config.schema import Config
from utils.training.train_step import TrainStep


def make_step(model, batch_chunk=1, precision=None, **scaler_kw):
    args = Config.build("train", dict(fp16=precision == "fp16", bf16=precision == "bf16"))
    device = torch.device("cpu")
    scaler = torch.amp.GradScaler("cpu", **scaler_kw) if scaler_kw else grad_scaler(args, device)
    optimizer = Lamb(model.parameters(), lr=0.01)
    return TrainStep(model, model, optimizer, scaler, amp_context(args, device), clip=0.25, batch_chunk=batch_chunk)


def test_chunks_give_the_gradient_of_the_whole_batch_and_keep_a_memory_per_chunk():
    data = tokens(13, 4, 40)
    grads, mems_out = [], []
    for chunks in (1, 2):
        model = tiny_model(0, tgt_len=6, mem_len=6).train()
        step = make_step(model, batch_chunk=chunks)
        step.optimizer.step = lambda: None                                 # keep the gradients, no update
        mems = [None] * chunks
        step(data[:6], data[1:7], mems)
        loss, norm = step(data[6:12], data[7:13], mems)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        mems_out.append(torch.cat(mems, 2))                                # [n_layer, mlen, bsz, d]
        assert isinstance(loss, float) and norm > 0
    assert (grads[0] - grads[1]).abs().max().item() < 1e-12
    assert (mems_out[0] - mems_out[1]).abs().max().item() < 1e-12


def test_fp16_overflow_skips_the_update_counts_it_and_lowers_the_scale():
    model = tiny_model(0, dtype=torch.float32).train()
    before = [p.detach().clone() for p in model.parameters()]
    step = make_step(model, precision="fp16", init_scale=2.0 ** 60)      # fp16 gradients overflow at once
    data = tokens(7, 2, 40)
    step(data[:6], data[1:7], [None])
    assert step.skipped_steps == 1
    assert step.scaler.get_scale() == 2.0 ** 59
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_keeps_float32_weights_gradients_and_optimizer_state(precision):
    model = tiny_model(0, dtype=torch.float32).train()
    step = make_step(model, precision=precision)
    data = tokens(7, 2, 40)
    loss, _ = step(data[:6], data[1:7], [None])
    assert loss == loss and step.skipped_steps == 0
    for p in model.parameters():
        assert p.dtype == torch.float32 and (p.grad is None or p.grad.dtype == torch.float32)
        state = step.optimizer.state[p]
        assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float32


def speed_args(*argv):
    return parse_args(train_parser(), ["--data", "x", *argv], section="train")


def test_speed_flags_resolve_per_device():
    args = resolve_speed_flags(speed_args(), torch.device("cpu"))
    assert (args.compile, args.attn_impl, args.tf32) == (False, "math", False)
    args = resolve_speed_flags(speed_args(), torch.device("cuda"))
    assert (args.compile, args.attn_impl, args.tf32) == (True, "sdpa", True)
    args = resolve_speed_flags(speed_args("--no_compile", "--attn_impl", "flex", "--no_tf32"), torch.device("cuda"))
    assert (args.compile, args.attn_impl, args.tf32) == (False, "flex", False)


@pytest.mark.parametrize("argv, message", [
    (["--cuda_graphs", "--no_compile"], "--cuda_graphs needs --compile"),
    (["--cuda_graphs", "--batch_chunk", "2"], "--cuda_graphs needs --batch_chunk 1"),
    (["--attn_impl", "fused"], "invalid choice"),
])
def test_speed_flag_errors(argv, message):
    with pytest.raises(UserError, match=message):
        speed_args(*argv)


def test_cuda_graphs_on_the_cpu_is_refused():
    with pytest.raises(UserError, match="needs a GPU"):
        resolve_speed_flags(speed_args("--cuda_graphs"), torch.device("cpu"))


@pytest.mark.slow
def test_benchmark_script_runs_the_training_step_and_reports(tmp_path):
    out = tmp_path / "r.jsonl"
    cmd = [sys.executable, str(REPO / "scripts" / "benchmark_train.py"), "--preset", "cpu_small", "--steps", "2",
           "--warmup", "1", "--precision", "bf16", "--checkpoint_activations", "--saved_activations",
           "--json", str(out), "--", "--n_layer", "1", "--d_model", "32", "--n_head", "2", "--d_head", "16",
           "--d_inner", "64", "--tgt_len", "8", "--mem_len", "8", "--eval_tgt_len", "8", "--batch_size", "4",
           "--no_cuda"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "tokens/s" in proc.stdout and "MFU n/a" in proc.stdout and "saved activations" in proc.stdout
    result = json.loads(out.read_text())
    assert result["steps"] == 2 and result["tokens_per_s"] > 0 and result["checkpoint_activations"]
    assert result["batch_size"] == 4 and result["tgt_len"] == 8 and result["precision"] == "bf16"


@pytest.mark.slow
@pytest.mark.parametrize("attn_type", [0, 1, 2, 3])
def test_compiled_training_step_equals_the_eager_one(attn_type):
    """train.py --compile: two steps through torch.compile give the eager losses, gradient norms, memories
    and updated weights, for every attention type (2 layers, so a later layer's stored input is checked)."""
    import shutil
    if not any(shutil.which(cc) for cc in ("g++", "c++", "clang++")):
        pytest.skip("no C++ compiler on PATH: torch.compile's CPU backend (inductor) cannot build kernels")
    from utils.runtime.device import compile_model
    data = tokens(13, 2, 40)
    results = []
    for compile_ in (False, True):
        torch._dynamo.reset()
        model = tiny_model(attn_type, n_layer=2, dtype=torch.float32, tgt_len=6, mem_len=6).train()
        step = make_step(model)
        step.forward_model = compile_model(model, Config.build("train", dict(compile=compile_)))
        mems = [None]
        out = [step(data[:6], data[1:7], mems)]
        first_mems = mems[0].clone()
        out.append(step(data[6:12], data[7:13], mems))
        results.append((out, first_mems, mems[0], [p.detach().clone() for p in model.parameters()]))
    (eager, eager_m1, eager_m2, eager_w), (comp, comp_m1, comp_m2, comp_w) = results
    for (l_e, n_e), (l_c, n_c) in zip(eager, comp):
        assert l_c == pytest.approx(l_e, rel=1e-5) and n_c == pytest.approx(n_e, rel=1e-4)
    assert (comp_m1 - eager_m1).abs().max().item() < 1e-4
    assert (comp_m2 - eager_m2).abs().max().item() < 1e-4
    assert max((a - b).abs().max().item() for a, b in zip(eager_w, comp_w)) < 1e-4


@pytest.mark.slow
def test_compiled_for_the_cpu_dropout_draws_the_eager_masks():
    """compile_model on the CPU routes dropout through ATen's random ops (inductor's fallback_random): the same
    seed gives the compiled step the eager masks, so its losses equal the eager ones (inductor's own generator
    would draw other masks and another loss)."""
    import shutil
    if not any(shutil.which(cc) for cc in ("g++", "c++", "clang++")):
        pytest.skip("no C++ compiler on PATH: torch.compile's CPU backend (inductor) cannot build kernels")
    import torch._inductor.config as inductor_config
    from utils.runtime.device import compile_model
    data = tokens(13, 2, 40)
    losses = []
    fallback_random = inductor_config.fallback_random
    try:
        for compile_ in (False, True):
            torch._dynamo.reset()
            model = tiny_model(0, n_layer=2, dtype=torch.float32, tgt_len=6, mem_len=6, dropout=0.3).train()
            step = make_step(model)
            step.forward_model = compile_model(model, Config.build("train", dict(compile=compile_)))
            torch.manual_seed(5)
            mems = [None]
            losses.append([step(data[:6], data[1:7], mems)[0], step(data[6:12], data[7:13], mems)[0]])
        assert inductor_config.fallback_random
    finally:
        inductor_config.fallback_random = fallback_random
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
