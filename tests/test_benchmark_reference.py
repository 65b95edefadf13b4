"""scripts/benchmark_reference_train.py: the reference trainer's step timed beside ours (issue 18). The reference
is not part of this project; here a stand-in checkout whose modules are ours under the reference's names
(mem_transformer.MemTransformerLM, lamb.JITLamb / Lamb, data_utils.LMOrderedIterator share the reference's
signatures) checks the plumbing: flags parsed by our parser, the child process, the step (chunks and their
memories), the batches (against benchmark_train.py's stream cut independently here), the printed line that
scripts/benchmark_ab.py reads, and the one-line errors."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "benchmark_reference_train.py"
MODEL = ["--n_layer", "1", "--d_model", "32", "--n_head", "2", "--d_head", "16", "--d_inner", "64",
         "--tgt_len", "8", "--mem_len", "8", "--eval_tgt_len", "8", "--no_cuda", "--adaptive"]
SMALL = ["--preset", "cpu_small", "--batch_size", "4", "--steps", "2", "--warmup", "1", "--"] + MODEL

LOAD = """import importlib.util, sys
sys.path.append({repo!r})   # after the stand-in folder: its names first
spec = importlib.util.spec_from_file_location("ours_" + {name!r}, {path!r})
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
"""
# the stand-in model records each forward call: the batch shape and whether a memory came with it
MODEL_SHIM = """import json, os


class MemTransformerLM(module.MemTransformerLM):
    def forward(self, data, target, mems):
        with open(os.environ["STAND_IN_CALLS"], "a") as f:
            f.write(json.dumps([list(data.shape), mems is not None]) + "\\n")
        return super().forward(data, target, mems)
"""


def write_stand_in(ref: Path, model_shim: str = MODEL_SHIM) -> Path:
    ref.mkdir(parents=True)
    for name, source, export in [
            ("mem_transformer", REPO / "mem_transformer.py", model_shim),
            ("data_utils", REPO / "data_utils.py", "LMOrderedIterator = module.LMOrderedIterator\n"),
            ("lamb", REPO / "utils" / "training" / "lamb.py",
             "Lamb = module.Lamb\n\n\nclass JITLamb(module.Lamb):\n    pass\n")]:
        (ref / f"{name}.py").write_text(LOAD.format(repo=str(REPO), name=name, path=str(source)) + export)
    return ref


@pytest.fixture
def stand_in(tmp_path):
    """A folder laid out as the reference's pytorch/ folder, its modules ours."""
    return write_stand_in(tmp_path / "pytorch")


def run(*argv, env=None):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, argv)], capture_output=True, text=True,
                          cwd=REPO, timeout=300, env=env)


def expected_checksum(monkeypatch, batch_size, tgt_len, warmup, steps, n_token=33278, seed=1111):
    """The timed targets of benchmark_train.py's synthetic stream, cut by our iterator, as the script sums them."""
    import torch
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    import benchmark_train
    import data_utils
    stream = benchmark_train.synthetic_stream(n_token, (warmup + steps + 2) * tgt_len * batch_size, None, seed)
    total = 0
    for i, (_, target, _, _) in enumerate(data_utils.LMOrderedIterator(stream, batch_size, tgt_len)):
        if warmup <= i < warmup + steps:
            flat = target.reshape(-1)
            total += int((flat * torch.arange(1, flat.numel() + 1)).sum())
    return total


@pytest.mark.slow
def test_the_reference_step_runs_on_the_same_batches_and_prints_what_benchmark_ab_reads(stand_in, tmp_path,
                                                                                         monkeypatch):
    calls = tmp_path / "calls.jsonl"
    env = {**__import__("os").environ, "STAND_IN_CALLS": str(calls)}
    result = run("--reference", stand_in, *SMALL, env=env)
    assert result.returncode == 0, result.stderr
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    import benchmark_ab
    assert benchmark_ab.throughput(result.stdout) > 0
    assert "optimizer JITLamb" in result.stdout          # cpu_small's --optim jitlamb
    # as the reference ships: the C library's and OpenMP's defaults; the stand-in has no train.py: profiling on
    assert "JIT profiling executor on | process settings the defaults" in result.stdout
    checksum = int(result.stdout.split("timed targets checksum ")[1].split()[0])
    assert checksum == expected_checksum(monkeypatch, batch_size=4, tgt_len=8, warmup=1, steps=2)
    # one forward per step on the whole batch; the first without memory, the next ones with it
    assert [json.loads(line) for line in calls.read_text().splitlines()] == [[[8, 4], False], [[8, 4], True],
                                                                              [[8, 4], True]]
    # the same model as scripts/benchmark_train.py builds: its parameter count
    ours = subprocess.run([sys.executable, str(REPO / "scripts" / "benchmark_train.py"), *SMALL],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert ours.returncode == 0, ours.stderr
    count = [line.split("; ")[1].split(" ")[0] for line in (result.stdout + ours.stdout).splitlines()
             if "tokens per cluster" in line]
    assert len(count) == 2 and count[0] == count[1], count


@pytest.mark.slow
def test_each_batch_chunk_keeps_its_own_memory(stand_in, tmp_path):
    calls = tmp_path / "calls.jsonl"
    env = {**__import__("os").environ, "STAND_IN_CALLS": str(calls)}
    result = run("--reference", stand_in, "--our_process_settings", "--jit_profiling", "off", *SMALL,
                 "--batch_chunk", "2", env=env)
    assert result.returncode == 0, result.stderr
    assert "2 chunk(s)" in result.stdout
    assert "JIT profiling executor off | process settings ours (malloc reuse, GOMP_SPINCOUNT" in result.stdout
    # 3 steps x 2 chunks of 2 columns; each chunk's first forward has no memory, its later ones have
    assert [json.loads(line) for line in calls.read_text().splitlines()] == \
        [[[8, 2], False], [[8, 2], False]] + [[[8, 2], True]] * 4


def test_a_reference_that_does_not_load_gets_one_line(tmp_path):
    ref = write_stand_in(tmp_path / "pytorch", model_shim="raise ImportError('no module named apex')\n")
    result = run("--reference", ref, *SMALL)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "does not load here" in lines[0] \
        and "no module named apex" in lines[0], result.stderr


@pytest.mark.parametrize("argv, words", [
    ([], "--reference DIR is required"),
    (["--reference", "{tmp}"], "no mem_transformer.py, lamb.py, data_utils.py there"),
    (["--reference", "{ref}", "--precision", "bf16"], "without --precision"),
    (["--reference", "{ref}", "--attn_impl", "sdpa", "--", "--varlen"], "without --attn_impl, --varlen: drop them"),
    (["--reference", "{ref}", "--", "--optim", "adam", "--no_cuda"], "--optim jitlamb or lamb"),
    (["--reference", "{ref}", "--", "--cuda"], "runs on the CPU: pass --no_cuda"),
    (["--reference", "{ref}", "--jit_profiling", "maybe"], "invalid choice: 'maybe'"),
])
def test_bad_input_gets_one_line(stand_in, tmp_path, argv, words):
    argv = [a.format(tmp=tmp_path, ref=stand_in) for a in argv]
    cut = argv.index("--") if "--" in argv else len(argv)
    result = run(*argv[:cut], "--preset", "cpu_small", *argv[cut:])
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], result.stderr


def test_help_prints_the_usage():
    result = run("--help")
    assert result.returncode == 0 and "--reference" in result.stdout


# scripts/compare_reference_train.py: our step against the reference's, step by step. It needs the reference's
# code, which this project does not contain: with TXL_REFERENCE_DIR set to a checkout's pytorch/ folder the
# comparison runs (float64, dropout on, attention types 0 and 1, div_val 1 and 4, chunks); otherwise it skips.
COMPARE = REPO / "scripts" / "compare_reference_train.py"
REFERENCE_DIR = __import__("os").environ.get("TXL_REFERENCE_DIR")


@pytest.mark.slow
@pytest.mark.skipif(not REFERENCE_DIR, reason="TXL_REFERENCE_DIR (a checkout of the reference's pytorch/ folder) "
                                               "is not set")
@pytest.mark.parametrize("flags", [["--attn_type", "0"], ["--attn_type", "1", "--dropatt", "0.1"],
                                   ["--div_val", "4"], ["--batch_chunk", "2", "--pre_lnorm"]])
def test_our_step_equals_the_reference_trainers_step_by_step(flags):
    model = ["--n_layer", "2", "--d_model", "64", "--n_head", "2", "--d_head", "32", "--d_inner", "128",
             "--tgt_len", "16", "--mem_len", "16", "--eval_tgt_len", "16", "--no_cuda", "--optim", "lamb"]
    result = subprocess.run([sys.executable, str(COMPARE), "--reference", REFERENCE_DIR, "--preset", "base",
                             "--batch_size", "4", "--steps", "4", "--float64", "--", *model, *flags],
                            capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode == 0 and result.stdout.strip().endswith("agree"), result.stdout + result.stderr


def test_the_comparison_without_a_reference_gets_one_line(tmp_path):
    for argv in ([], ["--reference", str(tmp_path)]):
        result = subprocess.run([sys.executable, str(COMPARE), *argv, "--preset", "cpu_small"], capture_output=True,
                                text=True, cwd=REPO, timeout=120)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: --reference"), \
            result.stderr
