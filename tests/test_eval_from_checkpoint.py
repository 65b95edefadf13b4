"""eval.py from the checkpoint alone (issue 17): `eval.py --model WORK/checkpoint_best.pt` with no other flag
scores the corpus the model was trained on with the lengths training evaluated with, and prints the
perplexities training printed; a data folder that moved gives one line naming the stored path and --data."""
import json
import shutil

import pytest

import cli_runner
from cli_runner import parse_line, tiny_args


def _result(lines, split):
    line = next(l for l in lines if l.startswith(f"| {split} loss"))
    return parse_line(line, f"result_{split}")


@pytest.fixture(scope="module")
def wt2_trained(tmp_path_factory):
    """A tiny model trained 4 steps on a copy of WikiText-2 (the copy: its cache, and a folder to rename) whose
    valid and test splits are cut to their first 400 lines: scoring the whole splits takes ~20 s each here."""
    from conftest import SHARED
    source = SHARED / "data" / "wikitext-2"
    if not (source / "train.txt").is_file():
        pytest.skip(f"{source} not present")
    tmp = tmp_path_factory.mktemp("wt2")
    data = tmp / "wikitext-2"
    data.mkdir()
    shutil.copy(source / "train.txt", data / "train.txt")
    for split in ("valid", "test"):
        lines = (source / f"{split}.txt").read_text(encoding="utf-8").splitlines(keepends=True)
        (data / f"{split}.txt").write_text("".join(lines[:400]), encoding="utf-8")
    # evaluation lengths unlike eval.py's defaults (64 / 640 / 16), and an eval segment unlike tgt_len
    argv = tiny_args(data, tmp / "work", dataset="wt2", tgt_len=12, mem_len=20, eval_tgt_len=8, clamp_len=30,
                     eval_batch_size=40, max_step=4, eval_interval=4, log_interval=2, eval_max_steps=-1,
                     adaptive=True, div_val=2, d_embed=32)
    result = cli_runner.train(argv, tmp, timeout=600)
    assert result.returncode == 0, result.stderr
    return data, tmp / "work", result


@pytest.mark.slow
def test_eval_with_the_checkpoint_alone_prints_what_training_printed(wt2_trained, tmp_path):
    data, work, trained = wt2_trained
    result = cli_runner.evaluate(["--model", work / "checkpoint_best.pt"], tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr
    start = next(l for l in result.lines if l.startswith("From the checkpoint's configuration:"))
    # eval_lengths(12, 0, 20, 8): segments of 8 with the context of training (mem 20 + 12 - 8)
    assert start == (f"From the checkpoint's configuration: --data {data}, --dataset wt2, --tgt_len 8, "
                     "--ext_len 0, --mem_len 24, --clamp_len 30, --same_length off, --batch_size 40")
    assert parse_line(next(l for l in result.lines if l.startswith("Evaluating with")), "evaluating_with") == [
        "fp32", "pytorch", 40, 8, 0, 24, 30]
    valid_train = [parse_line(l, "eval") for l in trained.lines if l.startswith("| Eval")]
    test_train = next(parse_line(l, "test") for l in trained.lines if l.startswith("| End of training"))
    assert valid_train and test_train
    # the same numbers to the printed digits: loss (2 decimals) and perplexity (3 decimals)
    assert _result(result.lines, "valid") == valid_train[-1][3:5]
    assert _result(result.lines, "test") == test_train[1:3]
    recs = [json.loads(l) for l in (work / "train_log.json").read_text().splitlines()]
    evals = [json.loads(l) for l in (work / "eval_log.json").read_text().splitlines()]
    valid_loss = next(r["valid_loss"] for r in recs if "valid_loss" in r and isinstance(r["step"], int))
    test_loss = next(r["test_loss"] for r in recs if r["step"] == "SUMMARY")
    scored = {r["split"]: r["eval_loss"] for r in evals if r["step"] == "SUMMARY" and "split" in r}
    assert scored["valid"] == pytest.approx(valid_loss, rel=1e-6)
    assert scored["test"] == pytest.approx(test_loss, rel=1e-6)

    # a renamed data folder: one line naming the stored path and --data, nothing scored
    moved = data.with_name("moved")
    data.rename(moved)
    try:
        missing = cli_runner.evaluate(["--model", work / "checkpoint_best.pt", "--work_dir", tmp_path / "m"],
                                      tmp_path, name="missing")
    finally:
        moved.rename(data)
    assert missing.returncode == 2
    error_lines = [l for l in missing.stderr.splitlines() if l.strip()]
    assert len(error_lines) == 1 and str(data) in error_lines[0] and "--data" in error_lines[0]
    assert "Traceback" not in missing.stderr


@pytest.mark.slow
def test_given_lengths_win_over_the_checkpoint(wt2_trained, tmp_path):
    data, work, _ = wt2_trained
    result = cli_runner.evaluate(["--model", work / "checkpoint_best.pt", "--mem_len", 4, "--batch_size", 8,
                                  "--split", "valid", "--max_size", 3], tmp_path)
    assert result.returncode == 0, result.stderr
    start = next(l for l in result.lines if l.startswith("From the checkpoint's configuration:"))
    assert "--mem_len" not in start and "--batch_size" not in start and "--tgt_len 8" in start
    assert parse_line(next(l for l in result.lines if l.startswith("Evaluating with")), "evaluating_with") == [
        "fp32", "pytorch", 8, 8, 0, 4, 30]
