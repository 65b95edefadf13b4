"""scripts/benchmark_reference_train.py: the reference trainer's step timed beside ours (issue 18). The reference
is not part of this project; here a stand-in checkout whose three modules are ours under the reference's names
(mem_transformer.MemTransformerLM, lamb.JITLamb / Lamb, data_utils.LMOrderedIterator, which share the
reference's signatures) checks the plumbing: flags parsed by our parser, the child process, the step, the
printed line that scripts/benchmark_ab.py reads, and the one-line errors."""
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "benchmark_reference_train.py"
SMALL = ["--preset", "cpu_small", "--batch_size", "4", "--steps", "2", "--warmup", "1", "--",
         "--n_layer", "1", "--d_model", "32", "--n_head", "2", "--d_head", "16", "--d_inner", "64",
         "--tgt_len", "8", "--mem_len", "8", "--eval_tgt_len", "8", "--no_cuda", "--adaptive"]

SHIM = """import importlib.util, sys
sys.path.append({repo!r})   # after the stand-in folder: its names first
spec = importlib.util.spec_from_file_location("ours_" + {name!r}, {path!r})
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
"""


@pytest.fixture
def stand_in(tmp_path):
    """A folder laid out as the reference's pytorch/ folder, its modules ours."""
    ref = tmp_path / "pytorch"
    ref.mkdir()
    for name, source, export in [("mem_transformer", REPO / "mem_transformer.py", "MemTransformerLM = module.MemTransformerLM"),
                                 ("data_utils", REPO / "data_utils.py", "LMOrderedIterator = module.LMOrderedIterator"),
                                 ("lamb", REPO / "utils" / "training" / "lamb.py", "Lamb = JITLamb = module.Lamb")]:
        (ref / f"{name}.py").write_text(SHIM.format(repo=str(REPO), name=name, path=str(source)) + export + "\n")
    return ref


def run(*argv):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, argv)], capture_output=True, text=True,
                          cwd=REPO, timeout=300)


def test_the_reference_step_runs_and_prints_what_benchmark_ab_reads(stand_in):
    result = run("--reference", stand_in, *SMALL)
    assert result.returncode == 0, result.stderr
    sys.path.insert(0, str(REPO / "scripts"))
    import benchmark_ab
    assert benchmark_ab.throughput(result.stdout) > 0
    assert "optimizer Lamb" in result.stdout
    # the same batches and model as scripts/benchmark_train.py's: its cluster shares and parameter count
    ours = subprocess.run([sys.executable, str(REPO / "scripts" / "benchmark_train.py"), *SMALL],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert ours.returncode == 0, ours.stderr
    shares = [line.split("tokens per cluster: ")[1] for line in (result.stdout + ours.stdout).splitlines()
              if "tokens per cluster" in line]
    assert len(shares) == 2 and shares[0] == shares[1], shares
    n_params = [line.split("; ")[1].split(" ")[0] for line in (result.stdout + ours.stdout).splitlines()
                if "tokens per cluster" in line]
    assert n_params[0] == n_params[1], n_params


@pytest.mark.parametrize("argv, words", [
    ([], "--reference DIR is required"),
    (["--reference", "{tmp}"], "no mem_transformer.py, lamb.py, data_utils.py there"),
    (["--reference", "{ref}", "--precision", "bf16"], "float32 eager steps"),
    (["--reference", "{ref}", "--", "--optim", "adam"], "--optim jitlamb or lamb"),
])
def test_bad_input_gets_one_line(stand_in, tmp_path, argv, words):
    argv = [a.format(tmp=tmp_path, ref=stand_in) for a in argv]
    if "--" not in argv:
        argv += ["--preset", "cpu_small"]
    else:
        cut = argv.index("--")
        argv = argv[:cut] + ["--preset", "cpu_small"] + argv[cut:]
    result = run(*argv)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], result.stderr
