"""eval.py runtimes: TorchScript files and torch.compile print eager's perplexity for every attention type;
a TorchScript file evaluates without the project's model code; precisions; latency data. (Several processes:
tests/test_distributed.py.)"""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from inference_testlib import REPO, perplexities, run_cli, write_checkpoint, write_corpus
from inference_testlib import one_thread  # noqa: F401  (autouse: one thread per test module)
from inference.runtime import warm_up
from utils.io.errors import UserError

pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.*deprecated:DeprecationWarning")

EVAL_ARGS = ["--dataset", "custom", "--split", "valid", "--batch_size", "4", "--tgt_len", "8", "--mem_len", "16",
             "--clamp_len", "6", "--same_length", "--debug", "--log_interval", "1000"]
MODEL_CODE = ["mem_transformer", "utils.model.adaptive_softmax", "utils.model.log_uniform_sampler", "utils.model.init",
              "utils.model.reference_compat"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def checkpoints(corpus, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    return {t: write_checkpoint(folder / f"attn{t}.pt", corpus, attn_type=t) for t in (0, 1, 2, 3)}


def eval_ppl(capsys, *args) -> float:
    code, out, _ = run_cli("eval", list(args), capsys)
    assert code == 0, out
    return perplexities(out)["valid"]


def close(a: float, b: float, rel: float = 1e-4) -> bool:
    return abs(a - b) <= rel * abs(b)


@pytest.mark.parametrize("attn_type", [0, 1, 2, 3])
def test_torchscript_file_evaluates_like_the_eager_model(attn_type, corpus, checkpoints, tmp_path, capsys):
    base = ["--data", corpus, *EVAL_ARGS]
    eager = eval_ppl(capsys, "--model", checkpoints[attn_type], *base)
    ts_file = tmp_path / "model.ts"
    scripted = eval_ppl(capsys, "--model", checkpoints[attn_type], *base, "--type", "torchscript",
                        "--save_torchscript", ts_file)
    assert ts_file.is_file() and not list(tmp_path.glob(".*tmp"))
    from_file = eval_ppl(capsys, "--load_torchscript", ts_file, *base)
    assert eager > 1 and close(scripted, eager) and close(from_file, eager), (eager, scripted, from_file)


def test_torchscript_file_evaluates_without_the_model_code(corpus, checkpoints, tmp_path, capsys):
    """eval.py --load_torchscript in a process where importing the model code fails."""
    ts_file = tmp_path / "model.ts"
    base = ["--data", str(corpus), *EVAL_ARGS, "--mem_len", "12"]
    eager = eval_ppl(capsys, "--model", checkpoints[2], *base, "--save_torchscript", ts_file)
    blocker = (f"import runpy, sys; sys.modules.update(dict.fromkeys({MODEL_CODE!r})); "
               f"sys.argv = ['eval.py'] + {['--load_torchscript', str(ts_file)] + base!r}; "
               "runpy.run_path('eval.py', run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", blocker], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert close(perplexities(done.stdout)["valid"], eager)
    assert "type torchscript" in done.stdout and "mem_len 12" in done.stdout


STANDALONE = """
import json, sys, torch
extra = {"txl_meta.json": ""}
model = torch.jit.load(sys.argv[1], _extra_files=extra)
meta = json.loads(extra["txl_meta.json"])
ids = torch.tensor(json.loads(sys.argv[2]))
model.reset_length(5, 0, 7)
mems, total = model.init_mems(ids.size(1)), 0.0
for s in range(0, ids.size(0) - 1, 5):
    nll, mems = model(ids[s:s + 5], ids[s + 1:s + 6], mems)
    total += nll.double().sum().item()
imported = [m for m in sys.modules if m.split(".")[0] in ("mem_transformer", "utils", "inference", "data_utils")]
print(json.dumps({"nll": total, "n_token": len(meta["vocab"]["idx2sym"]), "project_modules": imported}))
"""


def test_torchscript_file_runs_in_a_process_without_the_project(checkpoints, tmp_path, capsys):
    """The saved file alone, in a process whose sys.path does not hold the project, computes eager's NLL."""
    from inference.runtime import load_for_inference, save_torchscript

    loaded = load_for_inference(model_path=checkpoints[1], overrides={"tgt_len": 5, "mem_len": 7})
    ts_file = save_torchscript(loaded.model, tmp_path / "model.ts", loaded.vocab, loaded.model_config, "custom")
    ids = torch.randint(0, len(loaded.vocab), (21, 3), generator=torch.Generator().manual_seed(0))
    expected, mems = 0.0, None
    with torch.no_grad():
        for s in range(0, 20, 5):
            nll, mems = loaded.model(ids[s:s + 5], ids[s + 1:s + 6], mems)
            expected += nll.double().sum().item()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", STANDALONE, str(ts_file), json.dumps(ids.tolist())], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, env={**env, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert result["project_modules"] == [] and result["n_token"] == len(loaded.vocab)
    assert abs(result["nll"] - expected) <= 1e-6 * abs(expected)


@pytest.mark.slow
def test_compiled_evaluation_prints_the_eager_perplexity(corpus, checkpoints, capsys):
    if not any(shutil.which(cc) for cc in ("g++", "c++", "clang++")):
        pytest.skip("no C++ compiler on PATH: torch.compile's CPU backend (inductor) cannot build kernels")
    base = ["--data", corpus, *EVAL_ARGS, "--mem_len", "8", "--max_size", "6"]   # two shapes: no memory, full
    for attn_type in (0, 1, 2, 3):
        eager = eval_ppl(capsys, "--model", checkpoints[attn_type], *base)
        compiled = eval_ppl(capsys, "--model", checkpoints[attn_type], *base, "--type", "compile")
        assert close(compiled, eager), (attn_type, eager, compiled)


@pytest.mark.parametrize("precision", ["--fp16", "--bf16"])
def test_half_precisions_run_on_the_cpu_close_to_fp32(precision, corpus, checkpoints, capsys):
    base = ["--model", checkpoints[0], "--data", corpus, *EVAL_ARGS]
    fp32 = eval_ppl(capsys, *base)
    code, out, _ = run_cli("eval", base + [precision], capsys)
    assert code == 0 and f"math {precision[2:]} type pytorch" in out
    assert close(perplexities(out)["valid"], fp32, rel=0.05)


def test_a_precision_that_cannot_run_is_one_user_error():
    class Unsupported(torch.nn.Module):
        def forward(self, data, target, mems):
            raise RuntimeError('"addmm_impl_cpu_" not implemented for \'Half\'\nmore detail')

    with pytest.raises(UserError, match=r"^fp16 with --type pytorch does not run on cpu .*addmm_impl_cpu_[^\n]*$"):
        warm_up(Unsupported(), 10, 4, 8, 2, torch.device("cpu"), "fp16", "pytorch")


def test_compile_of_a_torchscript_file_is_refused(corpus, checkpoints, tmp_path, capsys):
    ts_file = tmp_path / "model.ts"
    eval_ppl(capsys, "--model", checkpoints[0], "--data", corpus, *EVAL_ARGS, "--max_size", "3",
             "--save_torchscript", ts_file)
    with pytest.raises(UserError, match="--type compile needs a checkpoint"):
        run_cli("eval", ["--load_torchscript", ts_file, "--data", corpus, *EVAL_ARGS, "--type", "compile"], capsys)


def test_save_data_writes_the_samples_after_the_warm_up(corpus, checkpoints, tmp_path, capsys):
    args = ["--model", checkpoints[0], "--data", corpus, *EVAL_ARGS, "--save_data", "--max_size", "10",
            "--percentiles", "50", "90"]
    args.remove("--debug")
    code, out, _ = run_cli("eval", args + ["--work_dir", tmp_path], capsys)
    assert code == 0
    data = json.loads((tmp_path / "eval_data_4_fp32_pytorch.json").read_text())
    warmup = 16 // 8 + 2                                   # the reference's mem_len // tgt_len + 2
    assert len(data["latency"]) == len(data["throughput"]) == 10 - warmup
    latency = torch.tensor(data["latency"], dtype=torch.float64)
    assert f"Latency Avg: {latency.mean().item():.2f} ms" in out
    assert f"Latency 90%: {torch.quantile(latency, 0.9).item():.2f} ms" in out
    tokens_per_s = torch.tensor(data["throughput"], dtype=torch.float64)
    assert torch.allclose(tokens_per_s, 4 * 8 / (latency / 1000), rtol=1e-9)
    assert f"Throughput Avg: {tokens_per_s.mean().item():.2f} tok/s" in out
