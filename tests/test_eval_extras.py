"""eval.py's memory sweep, and character-level corpora in bits per character (issue 17)."""
import json
import math

import pytest

import cli_runner
from cli_runner import tiny_args


@pytest.fixture(scope="module")
def word_model(demo_corpus, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    result = cli_runner.train(tiny_args(demo_corpus, tmp / "work", max_step=10, eval_max_steps=2), tmp)
    assert result.returncode == 0, result.stderr
    return tmp / "work" / "checkpoint_best.pt"


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
