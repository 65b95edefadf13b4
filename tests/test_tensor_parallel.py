"""--tensor_parallel (--tp): Megatron-style tensor parallelism on the CPU (gloo), against one process.

The truth is a single process training on the same global batch: `--tp 2` over 2 processes (one tensor-parallel
group) and over 4 (2 data-parallel x 2 tensor-parallel, FSDP2 across the groups) must give the same per-step
losses (within 1e-5 relative, float32 with the reductions in another order), the same validation and test
losses and the same final weights. The memory carried between segments (--mem_len 32) makes every step after
the first depend on the previous ones. Checkpoints hold full tensors: a --tp 2 checkpoint evaluates in eval.py
on one process to the perplexity the run printed, and resumes at --tp 1 with the losses of a resume at --tp 2.
"""
import json
import random
import re
import sys

import pytest
import torch

from dist_testlib import (REPO, last_checkpoint, max_weight_difference, python_train, run, step_losses, summary,
                          torchrun, train_cmd, valid_losses)
from mem_transformer import MemTransformerLM
from utils.data.demo_corpus import write_demo_corpus
from utils.config.cli import parse_args, train_parser
from utils.distributed.tensor_parallel import check_layout, node_warning, parameters_per_rank, split_parameter_names
from utils.io.errors import UserError
from utils.model.model_config import build_model_config

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not available")

STEPS = 20
REL = 1e-5


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_demo_corpus(tmp_path_factory.mktemp("demo"), n_train_docs=100, n_eval_docs=10)


@pytest.fixture(scope="module")
def big_vocab_data(tmp_path_factory):
    """A corpus of 21000 word types (--adaptive keeps the cutoff 19997 of vocabularies above 19998 words): every
    type once, then Zipf-distributed text."""
    out = tmp_path_factory.mktemp("big_vocab")
    rng = random.Random(0)
    n_types = 21000
    for split, n_tokens in (("train", 40000), ("valid", 3000), ("test", 3000)):
        tokens = [f"w{i}" for i in range(n_types)] if split == "train" else []
        tokens += [f"w{min(int(rng.paretovariate(1.0)) - 1, n_types - 1)}" for _ in range(n_tokens)]
        (out / f"{split}.txt").write_text("".join(" ".join(tokens[i:i + 20]) + "\n" for i in range(0, len(tokens), 20)))
    return out


def assert_same_losses(work, reference, steps=range(1, STEPS + 1)):
    ours, theirs = step_losses(work), step_losses(reference)
    assert sorted(ours) == list(steps), f"steps logged: {sorted(ours)}"
    worst = max(abs(ours[s] - theirs[s]) / abs(theirs[s]) for s in ours)
    assert worst <= REL, f"per-step losses differ by up to {worst:.3g} (relative)"


def assert_same_training(work, reference):
    assert_same_losses(work, reference)
    assert valid_losses(work).keys() == valid_losses(reference).keys()
    for step, loss in valid_losses(work).items():
        assert loss == pytest.approx(valid_losses(reference)[step], rel=REL), f"valid loss at step {step}"
    assert summary(work)["test_loss"] == pytest.approx(summary(reference)["test_loss"], rel=REL)
    ours, theirs = last_checkpoint(work), last_checkpoint(reference)
    for name, value in ours["model_state"].items():      # full tensors of the single-process layout, not DTensors
        assert type(value) is torch.Tensor and value.shape == theirs["model_state"][name].shape, name
    assert max_weight_difference(ours["model_state"], theirs["model_state"]) <= 1e-4


def split_memory(stdout: str) -> float:
    """The fraction of the split layers' parameter bytes one rank holds (the log line of parallelize)."""
    found = re.search(r"split layers (\d+) of (\d+) bytes", stdout)
    assert found, "no tensor-parallel parameter memory line in the log"
    return int(found.group(1)) / int(found.group(2))


@pytest.fixture(scope="module")
def baseline(data, tmp_path_factory):
    """One process, attention type 1 (Shaw et al.: per-layer tables split with their heads), 20 steps."""
    work = tmp_path_factory.mktemp("one_process")
    result = python_train(data, work, "--max_step", str(STEPS), *ATTN1)
    assert result.returncode == 0, result.stderr[-3000:]
    return work


# the cosine schedule's horizon pinned: a run stopped at step 10 has the first 10 learning rates of one to 20
ATTN1 = ["--attn_type", "1", "--max_step_scheduler", str(STEPS)]


# ---- Acceptance 1: --tp 2 trains like one process ------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("div_val", ["1", "4"])
def test_tp2_trains_like_one_process_with_tied_adaptive_softmax(data, big_vocab_data, tmp_path, div_val):
    extra = ["--data", str(big_vocab_data), "--adaptive", "--div_val", div_val]     # attention type 0, tied
    one = python_train(data, tmp_path / "one", "--max_step", str(STEPS), *extra)
    assert one.returncode == 0, one.stderr[-3000:]
    result = torchrun(2, data, tmp_path / "tp2", "--max_step", str(STEPS), "--tp", "2", *extra)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "world size: 2 (tensor parallel 2 x data parallel 1)" in result.stdout
    assert_same_training(tmp_path / "tp2", tmp_path / "one")
    # Acceptance 4: each rank holds half of the split layers' parameters
    assert split_memory(result.stdout) == pytest.approx(0.5, abs=1e-3)
    # the memory calculator's list of split parameters is what the run split
    with torch.device("meta"):
        model = MemTransformerLM(**last_checkpoint(tmp_path / "tp2")["model_config"])
    names = set(split_parameter_names(model))
    split_bytes = int(re.search(r"split layers \d+ of (\d+) bytes", result.stdout).group(1))
    assert split_bytes == sum(4 * p.numel() for n, p in model.named_parameters() if n in names)
    # one data-parallel rank: the checkpoint has one memory, data position and random state
    ckpt = last_checkpoint(tmp_path / "tp2")
    assert ckpt["world_size"] == 1 and len(ckpt["memory"]) == 1


# ---- Acceptance 2: 2 data-parallel x 2 tensor-parallel -------------------------------------------------------
@pytest.mark.slow
def test_2d_four_processes_train_like_one(data, baseline, tmp_path):
    result = torchrun(4, data, tmp_path, "--max_step", str(STEPS), "--tp", "2", *ATTN1, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "world size: 4 (tensor parallel 2 x data parallel 2 fsdp)" in result.stdout
    assert_same_training(tmp_path, baseline)
    ckpt = last_checkpoint(tmp_path)
    assert ckpt["world_size"] == 2 and len(ckpt["memory"]) == 2 and len(ckpt["data_states"]) == 2


# ---- Acceptance 1 (another attention type) and 3: checkpoints do not depend on the layout ---------------------
def eval_summary(work_dir) -> dict:
    lines = (work_dir / "eval_log.json").read_text().splitlines()
    return [json.loads(line) for line in lines if '"SUMMARY"' in line][-1]


@pytest.mark.slow
def test_tp2_checkpoint_evaluates_in_one_process_and_resumes_at_tp1(data, baseline, tmp_path):
    """Attention type 1 at --tp 2: 10 steps, then resumed from its checkpoint at --tp 1 and at --tp 2 to step
    20; every step equals the uninterrupted one-process run."""
    tp2 = tmp_path / "tp2"
    result = torchrun(2, data, tp2, "--max_step", "10", "--tp", "2", *ATTN1)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert_same_losses(tp2, baseline, steps=range(1, 11))
    # eval.py, one process, the training-time test settings (segments of 32, memory 32, batch 8, 4 batches)
    ev = run([sys.executable, "eval.py", "--data", str(data), "--dataset", "custom", "--model",
              str(tp2 / "checkpoint_best.pt"), "--tgt_len", "32", "--mem_len", "32", "--batch_size", "8", "--split",
              "test", "--no_cuda", "--max_size", "4", "--work_dir", str(tmp_path / "eval")], 120)
    assert ev.returncode == 0, ev.stderr[-3000:]
    assert eval_summary(tmp_path / "eval")["eval_loss"] == pytest.approx(summary(tp2)["test_loss"], rel=REL)
    # the same checkpoint resumed at --tp 1 (one process) and at --tp 2: the same losses for steps 11..20
    at_tp1, at_tp2 = tmp_path / "resume_tp1", tmp_path / "resume_tp2"
    resumed = python_train(data, at_tp1, "--max_step", str(STEPS), "--restart", str(tp2 / "checkpoint_last.pt"),
                           *ATTN1)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "memory and random state start fresh" not in resumed.stdout + resumed.stderr
    resumed = torchrun(2, data, at_tp2, "--max_step", str(STEPS), "--tp", "2", "--restart",
                       str(tp2 / "checkpoint_last.pt"), *ATTN1)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-4000:]
    assert_same_losses(at_tp1, at_tp2, steps=range(11, STEPS + 1))
    assert_same_losses(at_tp2, baseline, steps=range(11, STEPS + 1))
    assert max_weight_difference(last_checkpoint(at_tp1)["model_state"],
                                 last_checkpoint(at_tp2)["model_state"]) <= 1e-4
    # the optimizer state is in the single-process layout: the same tensors as a --tp 1 checkpoint's
    opt_tp1, opt_tp2 = last_checkpoint(at_tp1)["optimizer_state"], last_checkpoint(at_tp2)["optimizer_state"]
    assert opt_tp1["state"].keys() == opt_tp2["state"].keys()
    for index, state in opt_tp2["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                theirs = opt_tp1["state"][index][key]
                assert type(value) is torch.Tensor and value.shape == theirs.shape
                assert torch.allclose(value, theirs, rtol=1e-3, atol=1e-6), (index, key)


# ---- Acceptance 5: layouts that cannot work, one line each ---------------------------------------------------
def test_layout_errors_are_one_line():
    with pytest.raises(UserError, match=r"--tensor_parallel 3 does not divide the 4 process\(es\)") as err:
        check_layout(3, 4, 8)
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match=r"--n_head 6 is not divisible by --tensor_parallel 4") as err:
        check_layout(4, 8, 6)
    assert "\n" not in str(err.value)
    check_layout(2, 4, 8)
    assert node_warning(2, 8) is None and node_warning(8, 8) is None
    warning = node_warning(8, 4)
    assert warning and "span nodes" in warning and "\n" not in warning
    assert "span nodes" in node_warning(4, 6)


def test_tp_in_one_process_is_one_line(data, tmp_path):
    result = python_train(data, tmp_path, "--max_step", "1", "--tp", "2")
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "--tensor_parallel 2 does not divide the 1 process(es)" in lines[0], result.stderr


# ---- Acceptance 4: the all-reduced bytes counted against the analytic figure ----------------------------------
@pytest.mark.slow
def test_benchmark_counts_the_analytic_all_reduce_volume():
    result = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                  "scripts/benchmark_train.py", "--preset", "cpu_small", "--steps", "1", "--warmup", "2",
                  "--batch_size", "4", "--", "--tp", "2", "--n_layer", "2", "--d_model", "64", "--d_inner", "128",
                  "--n_head", "2", "--d_head", "32"], 180)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    found = re.search(r"memory (\d+)\) forward ([\d,]+) B counted / ([\d,]+) B analytic, backward ([\d,]+) B counted "
                      r"/ ([\d,]+) B analytic", result.stdout)
    assert found, result.stdout[-3000:]
    mlen, fw, fw_analytic, bw, bw_analytic = (int(g.replace(",", "")) for g in found.groups())
    row = 4 * 64 * 4                                     # batch x d_model x float32 bytes
    assert mlen == 64                                    # the memory is full after the warm-up steps
    assert fw == fw_analytic == 2 * 2 * 64 * row         # 2 layers x 2 all-reduces x tgt_len 64
    assert bw == bw_analytic == 2 * (2 * 64 + mlen) * row
    assert split_memory(result.stdout) == pytest.approx(0.5, abs=0.01)


def test_memory_table_of_the_xl_preset(capsys):
    sys.path.insert(0, str(REPO / "scripts"))
    import tensor_parallel_memory
    assert tensor_parallel_memory.main(["--config_file", str(REPO / "configs" / "wt103_xl.yaml")]) == 0
    out = capsys.readouterr().out
    total = float(re.match(r"([\d.]+)B parameters: ([\d.]+)B split", out).group(1))
    assert 1.0 <= total <= 2.0
    rows = {int(m.group(1)): (float(m.group(2)), float(m.group(3)))
            for m in re.finditer(r"^\s+(\d) \|\s+(\d+)M \|\s+([\d.]+) GiB", out, re.M)}
    assert sorted(rows) == [1, 2, 4, 8]
    assert rows[1][0] == pytest.approx(total * 1000, abs=5)            # all parameters on one GPU (rounded)
    for small, large in ((1, 2), (2, 4), (4, 8)):       # parameters and their state shrink with TP
        assert rows[large][0] < rows[small][0] and rows[large][1] < rows[small][1]
    # train.py's memory check counts the same share per rank
    args = parse_args(train_parser(), ["--config_file", str(REPO / "configs" / "wt103_xl.yaml")], section="train")
    with torch.device("meta"):
        per_rank = parameters_per_rank(MemTransformerLM(**build_model_config(args, 267735)), 4)
    assert per_rank / 1e6 == pytest.approx(rows[4][0], abs=1)


@pytest.mark.slow
def test_replicated_parameters_stay_equal_with_dropout(data, tmp_path):
    """Dropout 0.1 (activations and attention): every rank of the group draws the same masks for the
    replicated activations, so the replicated parameters stay identical."""
    result = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                  "tests/tp_replica_train.py", *train_cmd(data, tmp_path)[1:], "--max_step", "5", "--tp", "2",
                  "--dropout", "0.1", "--dropatt", "0.1", "--debug"], 180)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "step 5: " in result.stdout and "replicated parameters equal on all ranks" in result.stdout
