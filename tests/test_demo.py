"""The built-in demo corpus (its long-range structure) and scripts/demo.py in a reduced form (few steps,
small corpus): both runs train and evaluate, the evaluations follow the stated protocol, and the printed
perplexities are the ones eval.py printed."""
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO
from utils.data.demo_corpus import DemoLanguage, write_demo_corpus


def documents(path):
    """The documents of a split: (title names, body lines)."""
    docs = []
    for line in path.read_text().splitlines():
        words = line.split()
        if words[0] == "=":
            docs.append((words[1:-1], []))
        else:
            docs[-1][1].append(words)
    return docs


def test_demo_corpus_is_deterministic(tmp_path):
    a = write_demo_corpus(tmp_path / "a", n_train_docs=5, n_eval_docs=2)
    b = write_demo_corpus(tmp_path / "b", n_train_docs=5, n_eval_docs=2)
    c = write_demo_corpus(tmp_path / "c", n_train_docs=5, n_eval_docs=2, seed=1)
    for split in ("train", "valid", "test"):
        assert (a / f"{split}.txt").read_bytes() == (b / f"{split}.txt").read_bytes()
    assert (a / "train.txt").read_bytes() != (c / "train.txt").read_bytes()
    assert not list(a.glob(".*.tmp"))


def test_demo_corpus_long_range_structure(tmp_path):
    """Every name in a document's body is one of the names in its title, and all content words of a document
    come from one topic: what the model needs to know lies in earlier segments."""
    language = DemoLanguage(seed=0)
    names = set(language.names)
    topic_of = {w: t for t, words in enumerate(language.topic_nouns) for w in words}
    topic_of.update({w: t for t, words in enumerate(language.topic_adjs) for w in words})
    docs = documents(write_demo_corpus(tmp_path, n_train_docs=40, n_eval_docs=1) / "train.txt")
    assert len(docs) == 40
    casts = set()
    for title, body in docs:
        assert len(title) == len(set(title)) == language.cast_size and set(title) <= names
        casts.add(tuple(sorted(title)))
        body_words = [w for line in body for w in line]
        assert {w for w in body_words if w in names} <= set(title)
        assert len({topic_of[w] for w in body_words if w in topic_of}) == 1
        assert 30 <= len(body) <= 60
    assert len(casts) > 30  # casts change from document to document
    assert len({topic_of[next(w for line in body for w in line if w in topic_of)] for _, body in docs}) > 8


@pytest.mark.slow
def test_demo_script_reduced(tmp_path):
    data = write_demo_corpus(tmp_path / "demo data", n_train_docs=20, n_eval_docs=3)
    work = tmp_path / "runs"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, str(REPO / "scripts/demo.py"), "--data", str(data), "--work_dir",
                             str(work), "--max_step", "4", "--eval_interval", "2", "--no_cuda"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    out = result.stdout
    assert result.returncode == 0, out[-3000:] + result.stderr[-3000:]
    # the model with memory is evaluated with the preset's memory, the other one without
    protocols = re.findall(r"Evaluating with: math fp32 type pytorch bsz (\d+) tgt_len (\d+) ext_len 0 mem_len (\d+)", out)
    assert protocols == [("16", "16", "64"), ("16", "16", "0")]
    printed = [float(x) for x in re.findall(r"\| test loss +[\d.]+ \| test ppl +([\d.]+) \n", out)]
    assert len(printed) == 2
    with_memory = float(re.search(r"  with memory    \(mem_len  64\):  test ppl +([\d.]+)\n", out).group(1))
    without = float(re.search(r"  without memory \(mem_len   0\):  test ppl +([\d.]+)\n", out).group(1))
    assert [with_memory, without] == pytest.approx(printed, abs=0.01)
    change, direction = re.search(r"With memory the test perplexity is ([\d.]+)% (lower|higher)\.", out).groups()
    signed = float(change) if direction == "higher" else -float(change)
    assert signed == pytest.approx(100 * (with_memory / without - 1), abs=0.1)
    assert (work / "with_memory/checkpoint_best.pt").is_file() and (work / "no_memory/checkpoint_best.pt").is_file()
    assert "mem_len: 0" in (work / "no_memory/config.yaml").read_text()
    assert "mem_len: 64" in (work / "with_memory/config.yaml").read_text()
