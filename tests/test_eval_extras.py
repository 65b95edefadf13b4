"""eval.py's memory sweep, and character-level corpora in bits per character (issue 17)."""
import json
import math

import pytest

import cli_runner
from cli_runner import tiny_args


@pytest.fixture(scope="module")
def word_model(demo_corpus, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    # --min_freq 1 keeps every word and adds <unk> (for the unknown words of --manual)
    result = cli_runner.train(tiny_args(demo_corpus, tmp / "work", max_step=10, eval_max_steps=2, min_freq=1), tmp)
    assert result.returncode == 0, result.stderr
    return tmp / "work" / "checkpoint_best.pt"


@pytest.fixture(scope="module")
def trained_without_unk(demo_corpus, tmp_path_factory):
    """Only the checkpoint matters (no training needed): 1 step."""
    tmp = tmp_path_factory.mktemp("no_unk")
    result = cli_runner.train(tiny_args(demo_corpus, tmp / "work", max_step=1, eval_interval=1, no_eval=True,
                                        no_test=True), tmp)
    assert result.returncode == 0, result.stderr
    return tmp / "work" / "checkpoint_last.pt"


def test_mem_len_sweep_prints_a_table_and_writes_json(word_model, tmp_path):
    sweep = cli_runner.evaluate(["--model", word_model, "--split", "valid", "--mem_len_sweep", "0,8,24",
                                 "--work_dir", tmp_path / "s"], tmp_path, name="sweep")
    assert sweep.returncode == 0, sweep.stderr
    data = json.loads((tmp_path / "s" / "mem_len_sweep.json").read_text())
    assert [(r["mem_len"], r["split"]) for r in data["results"]] == [(0, "valid"), (8, "valid"), (24, "valid")]
    assert data["tgt_len"] == 8 and data["batch_size"] == 4          # training's evaluation settings
    table = sweep.lines[sweep.lines.index("| split | mem_len | loss | ppl | vs mem_len 0 |"):]
    assert len(table) >= 5 and all(table[2 + i].startswith(f"| valid | {m} | ") for i, m in enumerate((0, 8, 24)))
    # each row is what a plain evaluation at that memory length scores
    single = cli_runner.evaluate(["--model", word_model, "--split", "valid", "--mem_len", 24, "--work_dir",
                                  tmp_path / "one"], tmp_path, name="one")
    assert single.returncode == 0, single.stderr
    (summary,) = [json.loads(l) for l in (tmp_path / "one" / "eval_log.json").read_text().splitlines()
                  if '"SUMMARY"' in l and '"split"' in l]
    assert data["results"][2]["loss"] == pytest.approx(summary["eval_loss"], rel=1e-12)
    assert data["results"][2]["ppl"] == pytest.approx(math.exp(summary["eval_loss"]), rel=1e-12)
    bad = cli_runner.evaluate(["--model", word_model, "--mem_len_sweep", "0,x"], tmp_path, name="bad")
    assert bad.returncode == 2 and "--mem_len_sweep" in bad.stderr


@pytest.mark.slow
def test_a_character_level_custom_corpus_reports_bpc(demo_corpus, tmp_path):
    """Training logs and metrics, eval.py's result line and JSON: bits per character; the cache is named
    after its level; --eval_max_steps 0 scores every batch, as in the reference."""
    work = tmp_path / "work"
    result = cli_runner.train(tiny_args(demo_corpus, work, custom_level="char", cache_dir=tmp_path / "cache",
                                        max_step=10, eval_interval=10, eval_max_steps=0), tmp_path, name="train")
    assert result.returncode == 0, result.stderr
    train_lines = [l for l in result.lines if l.startswith("| epoch")]
    assert train_lines and all(" | bpc " in l and " ppl " not in l for l in train_lines)
    assert any(l.startswith("| Eval") and " | bpc " in l for l in result.lines)
    assert any(l.startswith("| End of training") and " | test bpc " in l for l in result.lines)
    records = [json.loads(l) for l in (work / "train_log.json").read_text().splitlines()]
    valid = next(r for r in records if "valid_loss" in r)
    assert valid["valid_bits_per_character"] == pytest.approx(valid["valid_loss"] / math.log(2), rel=1e-12)
    assert any("train_bits_per_character" in r for r in records)
    caches = [p.name.split("-")[:2] for p in (tmp_path / "cache").rglob("meta.json")
              for p in [p.parent] if not p.name.startswith(".")]
    assert caches == [["custom", "char"]]

    scored = cli_runner.evaluate(["--model", work / "checkpoint_best.pt", "--split", "valid", "--work_dir",
                                  tmp_path / "eval"], tmp_path, name="eval")
    assert scored.returncode == 0, scored.stderr
    assert any(l.startswith("| valid loss") and " | valid bpc " in l for l in scored.lines)
    (summary,) = [json.loads(l) for l in (tmp_path / "eval" / "eval_log.json").read_text().splitlines()
                  if '"SUMMARY"' in l and '"split"' in l]
    assert summary["eval_bpc"] == pytest.approx(summary["eval_loss"] / math.log(2), rel=1e-12)
    # --eval_max_steps 0 in training scored the whole split: what eval.py scores over all of it
    assert summary["eval_loss"] == pytest.approx(valid["valid_loss"], rel=1e-6)


def test_progress_bars_only_when_asked_off_a_terminal(word_model, tmp_path):
    """Off a terminal (here: files) no bar unless --progress; with it a tqdm bar with its rate on stderr."""
    quiet = cli_runner.evaluate(["--model", word_model, "--split", "valid", "--work_dir", tmp_path / "q"], tmp_path,
                                name="quiet")
    shown = cli_runner.evaluate(["--model", word_model, "--split", "valid", "--work_dir", tmp_path / "p",
                                 "--progress"], tmp_path, name="shown")
    assert quiet.returncode == shown.returncode == 0, shown.stderr
    assert "evaluating" not in quiet.stderr
    assert "evaluating" in shown.stderr and "batch/s" in shown.stderr
    assert [l for l in quiet.lines if l.startswith("| valid")] == [l for l in shown.lines if l.startswith("| valid")]


def test_eta_from_the_fraction_done():
    from utils.training.progress import eta_seconds, format_duration, progress_fields
    # 30 s took the run from 20% to 50%: 50% left at 1% per 1 s -> 50 s
    assert eta_seconds(30.0, 0.5, 0.2) == pytest.approx(50.0)
    assert eta_seconds(10.0, 1.0) == 0.0 and eta_seconds(10.0, 0.2, 0.2) is None
    assert format_duration(3725.4) == "1:02:05" and format_duration(None) == "-"
    assert progress_fields(61, 3600) == " | elapsed 0:01:01 | eta 1:00:00"


def test_training_log_line_ends_with_elapsed_and_eta(word_model):
    log = (word_model.parent / "train_log.log").read_text().splitlines()
    lines = [l.split(" - ", 2)[-1] for l in log if "| epoch" in l]
    assert lines and all(cli_runner.parse_line(l, "train") for l in lines)     # the reference's fields first
    import re
    assert all(re.search(r" \| ppl +[\d.]+ \| elapsed \d+:\d\d:\d\d \| eta \d+:\d\d:\d\d$", l) for l in lines)
    assert lines[-1].endswith("| eta 0:00:00")                                  # at --max_step


def test_manual_file_scores_like_manual_and_unknown_words_are_counted(word_model, demo_corpus, tmp_path):
    words = (demo_corpus / "valid.txt").read_text().split()[:20] + ["zzqx", "qqzx", "zzqx"]
    text = " ".join(words)
    (tmp_path / "text.txt").write_text(text + "\n")
    by_file = cli_runner.evaluate(["--model", word_model, "--manual_file", tmp_path / "text.txt", "--work_dir",
                                   tmp_path / "f"], tmp_path, name="file")
    inline = cli_runner.evaluate(["--model", word_model, "--manual", text, "--work_dir", tmp_path / "i"], tmp_path,
                                 name="inline")
    assert by_file.returncode == inline.returncode == 0, by_file.stderr
    result = [l for l in by_file.lines if l.startswith("| all loss")]
    assert result and result == [l for l in inline.lines if l.startswith("| all loss")]
    assert f"--manual: 3 of {len(words)} words are not in the vocabulary and are scored as <unk>: zzqx, qqzx" in \
        by_file.lines
    both = cli_runner.evaluate(["--model", word_model, "--manual", "a", "--manual_file", tmp_path / "text.txt"],
                               tmp_path, name="both")
    assert both.returncode == 2 and "exclude each other" in both.stderr


def test_manual_with_a_vocabulary_without_unk_names_the_unknown_words(trained_without_unk, tmp_path):
    result = cli_runner.evaluate(["--model", trained_without_unk, "--manual", "zzqx the qqzx", "--work_dir",
                                  tmp_path], tmp_path)
    assert result.returncode == 2
    assert ("'zzqx' is not in the vocabulary, which has no <unk> to stand for unknown words (2 of 3 words are "
            "unknown: zzqx, qqzx)") in result.stderr


def test_every_character_level_corpus_reports_bpc():
    from utils.data.vocabulary import Vocab
    from utils.training.metrics import corpus_label, loss_metrics, uses_bpc
    chars, words = Vocab(delimiter=""), Vocab()
    assert uses_bpc(corpus_label("custom", "char")) and not uses_bpc(corpus_label("custom", "word"))
    assert uses_bpc(corpus_label("prepared", None, chars)) and not uses_bpc(corpus_label("prepared", None, words))
    assert uses_bpc(corpus_label("custom", None, chars))                   # eval.py: from the checkpoint's vocab
    assert corpus_label("enwik8") == "enwik8" and corpus_label("wt103", None, words) == "wt103"
    assert loss_metrics("valid", 0.7, corpus_label("prepared", None, chars)) == {
        "valid_loss": 0.7, "valid_bits_per_character": 0.7 / math.log(2)}
