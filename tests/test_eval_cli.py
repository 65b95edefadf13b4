"""eval.py end to end: the reference's printed results for its own checkpoint, our checkpoints scored like
train.py scored them, the splits, --manual, --max_size / --repeat, --save_data (JSON) and the output lines."""
import json
import math
import pickle
import shutil

import numpy as np
import pytest

import cli_runner
from cli_runner import parse_line, tiny_args

FIXTURE = "fixtures/reference-checkpoint"


def result_lines(result, split):
    return [l for l in result.lines if l.startswith(f"| {split} loss")]


def summary(work_dir):
    """The eval_ppl of each SUMMARY record of eval_log.json, in order."""
    recs = [json.loads(line) for line in (work_dir / "eval_log.json").read_text().splitlines()]
    return [(r["split"], r["eval_loss"], r["eval_ppl"]) for r in recs if r["step"] == "SUMMARY" and "split" in r]


# ---------------------------------------------------------------------------------------------------------
# the reference's checkpoint and what the reference's eval.py printed for it


def _fixture_cases():
    from conftest import SHARED
    path = SHARED / FIXTURE / "expected.json"
    cases = json.loads(path.read_text())["cases"] if path.is_file() else []
    return [pytest.param(case, id=case["args"].split()[0].lstrip("-") + str(i),
                         marks=[pytest.mark.slow] if "--data" in case["args"] else [])
            for i, case in enumerate(cases)] or [pytest.param(None, id="no-fixture")]


@pytest.mark.parametrize("case", _fixture_cases())
def test_reference_checkpoint_gives_the_reference_result_line(shared_dir, tmp_path, case):
    if case is None:
        pytest.skip("expected.json not present")
    args = case["args"].replace("../data/ptb", str(shared_dir / "data" / "ptb")).split()   # not shlex: "n't"
    argv = ["--model", shared_dir / FIXTURE / "ptb_tiny_attn0.pt", "--work_dir", tmp_path / "work",
            "--log_interval", "100000"] + args
    result = cli_runner.evaluate(argv, tmp_path)
    assert result.returncode == 0, result.stderr
    lines = [l for l in result.lines if l.startswith("| ") and " loss " in l]
    assert [l.rstrip() for l in lines] == [case["line"]]
    assert lines[0].endswith(" ")                            # the reference's format ends with a space
    (_, _, ppl), = summary(tmp_path / "work")
    assert abs(ppl - case["ppl"]) <= 1e-4 * case["ppl"]


def test_reference_checkpoint_loads_without_running_pickled_code(tmp_path):
    """A checkpoint whose pickle would run code when unpickled normally is refused, and the code never runs."""
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))
    path = tmp_path / "evil.pt"
    import torch
    torch.save({"model_state": {}, "model_config": {}, "vocab": Payload()}, path)
    result = cli_runner.evaluate(["--model", path, "--manual", "a", "--debug"], tmp_path)
    assert result.returncode == 2 and "error: " in result.stderr and "Traceback" not in result.stderr
    assert "not loaded" in result.stderr
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------------
# our checkpoints


@pytest.fixture(scope="module")
def trained(demo_corpus, tmp_path_factory):
    """20 steps of the tiny model; the periodic evaluations score the whole valid split."""
    tmp = tmp_path_factory.mktemp("trained")
    result = cli_runner.train(tiny_args(demo_corpus, tmp / "work", eval_max_steps=-1), tmp)
    assert result.returncode == 0, result.stderr
    return demo_corpus, tmp / "work", result


def eval_argv(trained, tmp_path, *extra):
    corpus, work, _ = trained
    return ["--model", work / "checkpoint_best.pt", "--data", corpus, "--dataset", "custom", "--tgt_len", 8,
            "--mem_len", 8, "--batch_size", 4, "--work_dir", tmp_path / "eval", *extra]


def test_split_all_scores_valid_then_test_as_train_py_did(trained, tmp_path):
    """With the training-time settings eval.py reproduces train.py's last validation and final test losses."""
    _, work, train_result = trained
    result = cli_runner.evaluate(eval_argv(trained, tmp_path, "--split", "all"), tmp_path)
    assert result.returncode == 0, result.stderr
    assert [l.split(" loss")[0] for l in result.lines if " loss " in l and l.startswith("| ") and "|" == l[0]
            and not l.startswith("| step")] == ["| valid", "| test"]
    (valid_split, valid_loss, _), (test_split, test_loss, _) = summary(tmp_path / "eval")
    assert (valid_split, test_split) == ("valid", "test")
    recs = [json.loads(line) for line in (work / "train_log.json").read_text().splitlines()]
    train_valid = [r["valid_loss"] for r in recs if "valid_loss" in r and isinstance(r["step"], int)]
    best = min(train_valid)
    assert valid_loss == pytest.approx(best, rel=1e-6)
    assert test_loss == pytest.approx(recs[-1]["test_loss"], rel=1e-6)
    valid_line = parse_line(result_lines(result, "valid")[0], "result_valid")
    assert valid_line == [round(valid_loss, 2), round(math.exp(valid_loss), 3)]
    assert parse_line(next(l for l in result.lines if l.startswith("Evaluating with")), "evaluating_with") == [
        "fp32", "pytorch", 4, 8, 0, 8, -1]
    times = [parse_line(l, "eval_time") for l in result.lines if l.startswith("Time : ")]
    assert len(times) == 2 and all(times)


def test_data_and_dataset_come_from_the_checkpoint_unless_given(trained, tmp_path):
    """Without --data / --dataset eval.py scores the corpus the model was trained on (stored in the checkpoint)
    and says so; given flags win."""
    corpus, work, _ = trained
    lengths = ["--tgt_len", 8, "--mem_len", 8, "--batch_size", 4, "--split", "valid"]
    stored = cli_runner.evaluate(["--model", work / "checkpoint_best.pt", "--work_dir", tmp_path / "a", *lengths],
                                 tmp_path, name="stored")
    assert stored.returncode == 0, stored.stderr
    assert any(line.startswith(f"From the checkpoint's configuration: --data {corpus}, --dataset custom, --ext_len 0")
               for line in stored.lines)
    given = cli_runner.evaluate(eval_argv(trained, tmp_path, "--split", "valid"), tmp_path, name="given")
    assert given.returncode == 0, given.stderr
    taken = [line for line in given.lines if line.startswith("From the checkpoint")]
    assert taken and not any(flag in taken[0] for flag in ("--data", "--dataset", "--tgt_len", "--mem_len"))
    assert result_lines(stored, "valid") == result_lines(given, "valid")
    elsewhere = cli_runner.evaluate(["--model", work / "checkpoint_best.pt", "--work_dir", tmp_path / "b",
                                     "--data", tmp_path / "missing", *lengths], tmp_path, name="elsewhere")
    assert elsewhere.returncode == 2 and str(tmp_path / "missing") in elsewhere.stderr


def test_text_is_encoded_with_the_checkpoint_vocabulary(trained, tmp_path):
    """Another folder with the same valid.txt but a different train.txt (whose vocabulary would number the
    words differently) gives the same result: the ids come from the checkpoint's vocabulary."""
    corpus, _, _ = trained
    other = tmp_path / "other"
    shutil.copytree(corpus, other)
    lines = (corpus / "train.txt").read_text().splitlines()
    (other / "train.txt").write_text("\n".join(reversed(lines[: len(lines) // 3])) + "\n")
    first = cli_runner.evaluate(eval_argv(trained, tmp_path, "--split", "valid"), tmp_path, name="same")
    argv = eval_argv(trained, tmp_path, "--split", "valid")
    argv[argv.index(corpus)] = other
    second = cli_runner.evaluate(argv, tmp_path, name="other")
    assert first.returncode == second.returncode == 0, second.stderr
    assert result_lines(first, "valid") == result_lines(second, "valid")
    (_, loss_same, _), (_, loss_other, _) = summary(tmp_path / "eval")
    assert loss_same == loss_other


def test_max_size_repeat_and_progress_lines(trained, tmp_path):
    once = cli_runner.evaluate(eval_argv(trained, tmp_path, "--split", "test", "--max_size", 5, "--log_interval", 1),
                               tmp_path, name="once")
    twice = cli_runner.evaluate(eval_argv(trained, tmp_path, "--split", "test", "--max_size", 5, "--repeat", 2,
                                          "--log_interval", 1), tmp_path, name="twice")
    assert once.returncode == twice.returncode == 0, twice.stderr
    progress = [parse_line(l, "eval_progress") for l in twice.lines if l.startswith("| step")]
    assert [(p[0], p[1], p[2]) for p in progress] == [(s, (s - 1) % 5 + 1, 5) for s in range(1, 11)]
    assert result_lines(once, "test") == result_lines(twice, "test")     # the same data twice: the same mean
    (_, loss_once, _), (_, loss_twice, _) = summary(tmp_path / "eval")
    assert loss_once == pytest.approx(loss_twice, rel=1e-12)


def test_save_data_writes_json_and_prints_percentiles(trained, tmp_path):
    result = cli_runner.evaluate(eval_argv(trained, tmp_path, "--split", "valid", "--save_data", "--percentiles",
                                           50, 90), tmp_path)
    assert result.returncode == 0, result.stderr
    path = tmp_path / "eval" / "eval_data_4_fp32_pytorch.json"
    data = json.loads(path.read_text())
    assert set(data) >= {"args", "throughput", "latency"}
    latency = np.array(data["latency"])
    n_batches = parse_line(next(l for l in result.lines if l.startswith("| step")), "eval_progress")[2]
    assert len(latency) == len(data["throughput"]) == n_batches - (8 // 8 + 2)   # minus the meters' warm-up
    assert parse_line(next(l for l in result.lines if l.startswith("Latency Avg")), "latency_avg") == [
        round(latency.mean(), 2)]
    percentiles = [parse_line(l, "latency_percentile") for l in result.lines if l.startswith("Latency ") and "%" in l]
    assert percentiles == [["50", round(np.percentile(latency, 50), 2)], ["90", round(np.percentile(latency, 90), 2)]]
    assert parse_line(next(l for l in result.lines if l.startswith("Throughput Avg")), "throughput_avg")
    with pytest.raises(pickle.UnpicklingError):
        pickle.loads(path.read_bytes())                       # JSON, not a pickle


def test_manual_text_on_our_checkpoint(trained, tmp_path):
    """--manual scores the words (+ <eos>) in segments of tgt_len carrying the memory: the same as a plain loop
    over the model in float64."""
    import torch
    from data_utils import tokenize_raw
    from mem_transformer import MemTransformerLM
    from utils.data.vocabulary import Vocab

    words = (trained[0] / "valid.txt").read_text().split()[:30]
    path = trained[1] / "checkpoint_best.pt"
    result = cli_runner.evaluate(["--model", path, "--manual", *words, "--tgt_len", 8, "--mem_len", 8,
                                  "--work_dir", tmp_path / "eval"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert parse_line(result_lines(result, "all")[0], "result_all")
    assert parse_line(next(l for l in result.lines if l.startswith("Evaluating with")), "evaluating_with")[2] == 1
    (_, loss, _), = summary(tmp_path / "eval")

    ckpt = torch.load(path, weights_only=True)
    ids = torch.tensor(Vocab.from_dict(ckpt["vocab"]).encode(tokenize_raw(" ".join(words)), add_eos=True))
    assert len(ids) == 31
    model = MemTransformerLM(**{**ckpt["model_config"], "tgt_len": 8, "mem_len": 8})
    model.load_state_dict(ckpt["model_state"])
    model.double().eval()
    total, mems = 0.0, None
    with torch.no_grad():
        for i in range(0, len(ids) - 1, 8):
            data, target = ids[i: i + 8], ids[i + 1: i + 9]
            nll, mems = model(data[: len(target), None], target[:, None], mems)
            total += nll.sum().item()
    assert loss == pytest.approx(total / (len(ids) - 1), rel=1e-5)


def test_targets_pass_and_fail_with_exit_codes(trained, tmp_path):
    passed = cli_runner.evaluate(eval_argv(trained, tmp_path, "--split", "valid", "--target_perplexity", "1e9",
                                           "--target_throughput", "1"), tmp_path, name="passed")
    assert passed.returncode == 0, passed.stderr
    assert "Perplexity test passed" in passed.lines and "Throughput test passed" in passed.lines
    failed = cli_runner.evaluate(eval_argv(trained, tmp_path, "--split", "valid", "--target_perplexity", "1.5"),
                                 tmp_path, name="failed")
    assert failed.returncode == 1 and failed.stderr == ""
    ppl = parse_line(result_lines(failed, "valid")[0], "result_valid")[1]
    assert f"Perplexity achieved: {ppl:.2f} target: 1.50" in failed.lines and "Perplexity test failed" in failed.lines
