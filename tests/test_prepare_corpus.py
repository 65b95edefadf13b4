"""scripts/prepare_corpus.py and utils/data/prepare.py: articles in, shards out, checked against plain Python
(an exact collections.Counter, articles re-tokenized line by line), and training on the result."""
import bz2
import collections
import gzip
import json
import lzma
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import cli_runner
from utils.data import prepare
from utils.data.prepare import Options, prepare_corpus

REPO = Path(__file__).resolve().parent.parent
SCRIPT = str(REPO / "scripts" / "prepare_corpus.py")


def zipf_articles(n_docs=120, vocab=3000, seed=0):
    """(title, text) articles: paragraphs of Zipf-distributed words (s = 1.1), some blank lines."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, vocab + 1) ** 1.1
    weights /= weights.sum()
    articles = []
    for d in range(n_docs):
        lines = []
        for _ in range(rng.integers(1, 5)):
            words = rng.choice(vocab, size=int(rng.integers(1, 30)), p=weights)
            lines.append(" ".join(f"w{w}" for w in words))
            if rng.random() < 0.3:
                lines.append("")
        articles.append((f"Title{d}", "\n".join(lines)))
    return articles


def write_jsonl(path, articles, opener=open):
    with opener(path, "wt", encoding="utf-8") as f:
        for title, text in articles:
            f.write(json.dumps({"id": 1, "title": title, "text": text}) + "\n")
    return path


def expected_symbols(title, text):
    """An article as the preparation promises it: title line, each non-empty line's words then <eos>, <eod>."""
    out = []
    for line in (title + "\n" + text).split("\n"):
        if line.split():
            out += line.split() + ["<eos>"]
    return out + ["<eod>"]


def exact_top(articles, n):
    """The n most frequent words by an exact Counter (ties in first-seen order, as Counter.most_common)."""
    counter = collections.Counter()
    for title, text in articles:
        counter.update(w for w in expected_symbols(title, text) if w not in ("<eos>", "<eod>"))
    return [w for w, _ in counter.most_common(n)]


def load_split(out, split):
    manifest = json.loads((out / "manifest.json").read_text())
    ids = np.concatenate([np.load(out / s["file"]) for s in manifest["splits"][split]["shards"]])
    return ids, np.load(out / f"{split}.docs.npy"), manifest


OPTS = dict(title_key="title", max_vocab_size=20, count_capacity=80, valid_docs=7, test_docs=5, chunk_bytes=2000,
            shard_tokens=700, seed=3)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prep")
    articles = zipf_articles()
    src = write_jsonl(tmp / "wiki.jsonl.gz", articles, gzip.open)
    out = tmp / "out1"
    prepare_corpus([src], out, Options(**OPTS), workers=1)
    return articles, src, out, tmp


def test_vocabulary_is_the_exact_top_n_although_the_counter_pruned(corpus):
    articles, _, out, _ = corpus
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counting"]["prunes"] > 0 and manifest["counting"]["decrement"] > 0  # the bound was hit
    assert manifest["counting"]["exact"]
    vocab = json.loads((out / "vocab.json").read_text())
    assert vocab["idx2sym"][:3] == ["<eos>", "<eod>", "<unk>"]
    assert vocab["idx2sym"][3:] == exact_top(articles, 20)


def test_articles_decode_to_their_words_and_each_split_has_one_eod_per_article(corpus):
    from utils.data.vocabulary import Vocab

    articles, _, out, _ = corpus
    vocab = Vocab.from_dict(json.loads((out / "vocab.json").read_text()))
    unk_of = lambda symbols: tuple(s if s in vocab.sym2idx else "<unk>" for s in symbols)  # noqa: E731
    expected = {}  # article as the vocabulary sees it -> its indices in the input
    for d, article in enumerate(articles):
        expected.setdefault(unk_of(expected_symbols(*article)), []).append(d)
    seen = {}
    for split in prepare.SPLITS:
        ids, starts, manifest = load_split(out, split)
        assert vocab.fingerprint() == manifest["vocab"]["fingerprint"]
        n_docs = manifest["splits"][split]["n_docs"]
        assert n_docs == {"train": 120 - 12, "valid": 7, "test": 5}[split]
        assert np.count_nonzero(ids == vocab.sym2idx["<eod>"]) == n_docs == len(starts) - 1
        assert starts[0] == 0 and starts[-1] == len(ids)
        assert manifest["splits"][split]["n_unk"] == np.count_nonzero(ids == vocab.unk_idx)
        order = []
        for a, b in zip(starts[:-1], starts[1:]):
            symbols = tuple(vocab.get_symbols(ids[a:b]))
            assert symbols in expected  # an input article, words outside the vocabulary as <unk>
            d = next(i for i in expected[symbols] if i not in seen)
            order.append(d)
            seen[d] = split
        assert order == sorted(order)  # articles keep the corpus order inside a split
    assert sorted(seen) == list(range(len(articles)))


def test_bytes_are_the_same_with_one_and_two_workers(corpus):
    _, src, out1, tmp = corpus
    out2 = tmp / "out2"
    prepare_corpus([src], out2, Options(**OPTS), workers=2)
    names = sorted(p.name for p in out1.iterdir())
    assert names == sorted(p.name for p in out2.iterdir()) and not (out2 / ".work").exists()
    for name in names:
        assert (out1 / name).read_bytes() == (out2 / name).read_bytes(), name


def test_every_input_format_gives_the_same_corpus(corpus, tmp_path):
    """The same articles as a JSON array (.xz), Wikipedia extractor output (.bz2, two files in a folder) and
    plain text files (one article per file) give the same vocabulary and ids as the JSON Lines file."""
    articles, _, out1, _ = corpus
    with lzma.open(tmp_path / "a.json.xz", "wt", encoding="utf-8") as f:
        json.dump([{"title": t, "text": x} for t, x in articles], f, indent=1)
    wiki = tmp_path / "extracted" / "AA"
    wiki.mkdir(parents=True)
    for part in range(2):
        with bz2.open(wiki / f"wiki_{part:02d}.bz2", "wt", encoding="utf-8") as f:
            for d in range(part * 60, part * 60 + 60):
                f.write(f'<doc id="{d}" url="x" title="{articles[d][0]}">\n{articles[d][0]}\n{articles[d][1]}\n</doc>\n')
    plain = tmp_path / "plain"
    plain.mkdir()
    for d, (title, text) in enumerate(articles):
        (plain / f"{d:04d}.txt").write_text(title + "\n" + text + "\n", encoding="utf-8")
    opts = dict(OPTS)
    for name, inputs in [("json", [tmp_path / "a.json.xz"]), ("wikiextractor", [tmp_path / "extracted"]),
                         ("plain", [plain])]:
        out = tmp_path / f"out-{name}"
        prepare_corpus(inputs, out, Options(**opts), workers=1)
        for f in sorted(out1.iterdir()):
            if f.name != "manifest.json":
                assert f.read_bytes() == (out / f.name).read_bytes(), (name, f.name)


def test_a_killed_run_resumes_with_the_chunks_it_finished(corpus, tmp_path, monkeypatch):
    _, src, out1, _ = corpus
    out = tmp_path / "out"
    original = prepare.tokenize_chunk
    done = []

    def tokenize_then_die(job):
        if len(done) == 5:
            raise KeyboardInterrupt  # killed in the middle of the pass
        done.append(job[0].index)
        return original(job)

    monkeypatch.setattr(prepare, "tokenize_chunk", tokenize_then_die)
    with pytest.raises(KeyboardInterrupt):
        prepare_corpus([src], out, Options(**OPTS), workers=1)
    kept = sorted((out / ".work" / "chunks").glob("*.npz"))
    assert len(kept) == 5 and not (out / "manifest.json").exists()
    tokenized = []
    monkeypatch.setattr(prepare, "tokenize_chunk", lambda job: (job[0] and tokenized.append(job[0].index)) or original(job))
    prepare_corpus([src], out, Options(**OPTS), workers=1)
    assert tokenized and min(tokenized) == 5  # the finished chunks were read back, not tokenized again
    for f in sorted(out1.iterdir()):
        assert f.read_bytes() == (out / f.name).read_bytes(), f.name


def test_bpe_level_articles_decode_to_their_text(corpus, tmp_path):
    """--level bpe: a byte-level BPE trained on the articles; each article decodes to its text exactly, one
    <|endoftext|> per article, the vocabulary file is a BPEVocab with the manifest's fingerprint."""
    from utils.data.vocabulary import BPEVocab, Vocab

    articles, src, _, _ = corpus
    out = tmp_path / "bpe"
    prepare_corpus([src], out, Options(title_key="title", level="bpe", bpe_vocab_size=400, valid_docs=7, test_docs=5,
                                       chunk_bytes=2000, shard_tokens=700), workers=2)
    vocab = Vocab.from_dict(json.loads((out / "vocab.json").read_text()))
    assert isinstance(vocab, BPEVocab) and 300 < len(vocab) <= 400
    texts = {f"{title}\n{text}" for title, text in articles}
    found = 0
    for split in prepare.SPLITS:
        ids, starts, manifest = load_split(out, split)
        assert vocab.fingerprint() == manifest["vocab"]["fingerprint"]
        assert np.count_nonzero(ids == vocab.eot_idx) == manifest["splits"][split]["n_docs"] == len(starts) - 1
        for a, b in zip(starts[:-1], starts[1:]):
            assert ids[b - 1] == vocab.eot_idx and vocab.decode(ids[a:b - 1]) in texts
            found += 1
    assert found == len(articles)


def run_script(*args):
    proc = subprocess.run([sys.executable, SCRIPT, "--no_progress", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO)
    return proc.returncode, proc.stdout, proc.stderr


def test_bad_inputs_get_one_line(tmp_path):
    good = json.dumps({"text": "a b c"})
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join([good, good, "{not json", good, good]) + "\n")
    code, _, err = run_script(bad, "--output", tmp_path / "o1", "--valid_docs", "1", "--test_docs", "1")
    assert code == 2 and err.count("\n") == 1 and "bad.jsonl: line 3: not valid JSON" in err and "--skip_bad_lines" in err
    assert not (tmp_path / "o1").exists()
    code, out, err = run_script(bad, "--output", tmp_path / "o2", "--valid_docs", "1", "--test_docs", "1",
                                "--skip_bad_lines", "--workers", "1")
    assert code == 0, err
    manifest = json.loads((tmp_path / "o2" / "manifest.json").read_text())
    assert manifest["bad_lines_skipped"] == 1 and manifest["n_docs"] == 4 and "1 bad lines skipped" in out

    nokey = tmp_path / "nokey.jsonl"
    nokey.write_text(json.dumps({"body": "x"}) + "\n")
    code, _, err = run_script(nokey, "--output", tmp_path / "o3")
    assert code == 2 and err.count("\n") == 1 and "line 1: the article has no 'text' key" in err and "--text_key" in err

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n" + json.dumps({"text": "  "}) + "\n")
    code, _, err = run_script(empty, "--output", tmp_path / "o4")
    assert code == 2 and err.count("\n") == 1 and "the corpus is empty" in err

    code, _, err = run_script(bad, "--output", tmp_path / "o5", "--skip_bad_lines", "--valid_docs", "2",
                              "--test_docs", "2")
    assert code == 2 and err.count("\n") == 1 and "the corpus has 4 article(s)" in err

    code, _, err = run_script(tmp_path / "missing.jsonl", "--output", tmp_path / "o6")
    assert code == 2 and err.count("\n") == 1 and "missing.jsonl: input not found" in err

    broken = tmp_path / "broken.jsonl.gz"
    whole = gzip.compress("".join(json.dumps({"text": str(i * i)}) + "\n" for i in range(5000)).encode())
    broken.write_bytes(whole[: len(whole) // 2])  # a download cut short
    code, _, err = run_script(broken, "--output", tmp_path / "o7")
    assert code == 2 and err.count("\n") == 1 and "broken.jsonl.gz: cannot read the input" in err

    if os.geteuid() != 0:  # root reads anything
        locked = tmp_path / "locked.jsonl"
        locked.write_text(good + "\n")
        locked.chmod(0)
        code, _, err = run_script(locked, "--output", tmp_path / "o8")
        assert code == 2 and err.count("\n") == 1 and "locked.jsonl: cannot read the input" in err


def test_sharded_ids_give_the_iterator_the_same_batches_as_one_array(corpus):
    """LMOrderedIterator over the shards (gathered) == over the concatenated array, with warm-up, roll, ranks."""
    import data_utils
    _, _, out, _ = corpus
    c = data_utils.get_lm_corpus(out, "prepared", verbose=False)
    assert len(c.train.paths) > 2
    whole = np.concatenate([np.load(p) for p in c.train.paths])
    assert np.array_equal(c.train[:], whole) and np.array_equal(c.train[650:1450], whole[650:1450])
    for kwargs in [dict(), dict(mem_len=16), dict(rank=1, world_size=2)]:
        a = data_utils.LMOrderedIterator(c.train, 4, 16, **kwargs)
        b = data_utils.LMOrderedIterator(whole, 4, 16, **kwargs)
        a.roll(5, 1)
        b.roll(5, 1)
        for (da, ta, *_), (db, tb, *_) in zip(a, b, strict=True):
            assert np.array_equal(da, db) and np.array_equal(ta, tb)


def test_train_on_a_prepared_folder_resumes_exactly_mid_shard(tmp_path):
    """16 steps in one go == 8 steps, stop, --restart, 8 more; the shards are 300 tokens, so batches (16 x 8)
    cross shard ends and the stop falls inside a shard."""
    from test_train_resume import assert_same_training

    src = write_jsonl(tmp_path / "c.jsonl", zipf_articles(n_docs=200, vocab=400, seed=1))
    data = tmp_path / "prepared"
    prepare_corpus([src], data, Options(max_vocab_size=300, valid_docs=10, test_docs=10, shard_tokens=300), workers=1)
    whole, split = cli_runner.train_whole_and_resumed(
        data, tmp_path, 16, dataset="prepared", max_step_scheduler=16, log_interval=1, eval_interval=8, no_test=True)
    assert_same_training(whole, split, range(1, 17))
    # eval.py scores the prepared valid split with the checkpoint's vocabulary
    scored = cli_runner.evaluate(["--model", whole / "checkpoint_last.pt", "--data", data, "--dataset",
                                  "prepared", "--split", "valid", "--tgt_len", 8, "--mem_len", 8, "--batch_size", 4,
                                  "--work_dir", tmp_path / "eval"], tmp_path, name="eval")
    assert scored.returncode == 0, scored.stderr
    assert any(line.startswith("| valid") and " loss " in line for line in scored.lines)



@pytest.mark.slow
def test_two_ranks_on_a_prepared_folder_resume_exactly_mid_shard(tmp_path):
    """DDP over 2 gloo ranks, each reading only its columns from 300-token shards: 8 steps in one go == 4
    steps, stop, --restart, 4 more (the stop falls inside a shard), losses and weights bit for bit."""
    import dist_testlib
    import torch

    if not torch.distributed.is_available():
        pytest.skip("torch.distributed not available")
    src = write_jsonl(tmp_path / "c.jsonl", zipf_articles(n_docs=200, vocab=400, seed=4))
    data = tmp_path / "prepared"
    prepare_corpus([src], data, Options(max_vocab_size=300, valid_docs=10, test_docs=10, shard_tokens=300), workers=1)
    flags = ["--dataset", "prepared", "--multi_gpu", "ddp", "--max_step_scheduler", "8", "--no_test"]
    whole = dist_testlib.torchrun(2, data, tmp_path / "whole", *flags, "--max_step", "8")
    assert whole.returncode == 0, (whole.stdout + whole.stderr)[-3000:]
    first = dist_testlib.torchrun(2, data, tmp_path / "split", *flags, "--max_step", "4")
    assert first.returncode == 0, (first.stdout + first.stderr)[-3000:]
    second = dist_testlib.torchrun(2, data, tmp_path / "split", *flags, "--max_step", "8",
                                   "--restart", str(tmp_path / "split"))
    assert second.returncode == 0, (second.stdout + second.stderr)[-3000:]
    ours, theirs = dist_testlib.step_losses(tmp_path / "split"), dist_testlib.step_losses(tmp_path / "whole")
    assert sorted(ours) == sorted(theirs) == list(range(1, 9))
    assert ours == theirs
    a, b = (dist_testlib.last_checkpoint(tmp_path / w)["model_state"] for w in ("split", "whole"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

def _python_path_symbols(records, opts):
    """tokenize_chunk's Python path: every symbol in a list, numbered in first-seen order with a dict."""
    prepare._set_worker(opts)
    tokens, lengths = prepare._tokens(records)
    table = dict(zip(dict.fromkeys(tokens), range(len(tokens))))
    return [table[t] for t in tokens], list(table), list(lengths)


@pytest.mark.parametrize("lower_case", [False, True])
def test_the_numpy_word_path_gives_what_the_python_path_gives(lower_case):
    """Random records of tricky pieces (specials as words, ASCII whitespace of every kind, empty lines and
    records, records that do not end an article, long words that share their first 8 bytes, non-ASCII)."""
    import random

    pieces = ["a", "b", "ab", "Ab", "A B", "<eos>", "<eod>", "<unk>", "longwordxyz", "longwordxyq", "é", "Straße",
              "\t", "\r", "\x0b", "\x0c", "\x1c", "\x1f", " ", "  ", "\n", "\n\n", "\n \n"]
    rng = random.Random(1)
    opts = Options(lower_case=lower_case)
    fast_runs = plain_runs = 0
    for _ in range(600):
        records = [("".join(rng.choice(pieces) for _ in range(rng.randint(0, 12))), rng.random() < 0.7)
                   for _ in range(rng.randint(1, 5))]
        prepare._set_worker(opts)
        fast = prepare._fast_word_ids(records)
        if fast is None:  # (lower-casing of non-ASCII text: the Python path)
            assert lower_case
            continue
        fast_runs += 1
        plain_runs += not any("<eos>" in text or "<eod>" in text for text, _ in records)  # (_insert_specials)
        ids, symbols, lengths = _python_path_symbols(records, opts)
        got = fast[1]
        if isinstance(got, prepare._Joined):  # the symbols as bytes, their keys and the specials' places
            assert got.n == len(symbols) and got.keys.tolist() == prepare.symbol_keys(symbols).tolist(), records
            assert got.special_at == [symbols.index(s) if s in symbols else -1 for s in opts.specials()], records
            got = got.strings()
        assert fast[0].tolist() == ids and got == symbols and fast[2].tolist() == lengths, records
    assert fast_runs > 100 and 50 < plain_runs < fast_runs - 50  # both ways of numbering <eos> and <eod>
    # non-ASCII whitespace (which str.split() splits on) goes to the Python path
    prepare._set_worker(Options())
    assert prepare._fast_word_ids([("a\u00a0b", True)]) is None


def test_candidate_maps_equal_the_string_look_up_and_a_hash_collision_is_left_to_it(tmp_path, monkeypatch):
    opts = Options()
    work = tmp_path / "work"
    chunks = [[("aa bb cc\ndd <eos> aa", True)], [("ee aa zz\n\nbb", False), ("ff <eod> cc", True)]]
    prepare._set_worker(opts)
    for i, records in enumerate(chunks):
        prepare.tokenize_chunk((prepare.Chunk(i, "x", 1, records=records), prepare._chunk_file(work, i)))

    def check(names, expect_files):
        k = len(names)
        table = {s: i for i, s in enumerate(names)} | {"<eos>": k, "<eod>": k + 1}
        for i in range(len(chunks)):
            mapped = prepare._chunk_file(work, i).with_suffix(".candidate.npy")
            assert mapped.exists() == expect_files[i]
            if mapped.exists():
                symbols = prepare.read_chunk(prepare._chunk_file(work, i))["symbols"]
                assert np.load(mapped).tolist() == [table.get(s, k + 2) for s in symbols]

    keys = np.sort(prepare.symbol_keys(["cc", "aa", "bb", "ff"]))
    real = prepare.symbol_keys
    monkeypatch.setattr(prepare, "symbol_keys", lambda symbols: pytest.fail("hashed again"))
    names = prepare._resolve(work, len(chunks), keys, opts)  # (the keys kept in the chunk files serve)
    assert names == ["aa", "bb", "cc", "ff"]  # first-seen order
    check(names, [True, True])
    # a collision: "zz" stored with the key of "aa" (as two long symbols with one hash would be)
    path = prepare._chunk_file(work, 1)
    with np.load(path) as z:
        data = dict(z)
    stored = data["keys"].copy()
    stored[data["symbols"].tobytes().decode().split("\n").index("zz")] = real(["aa"])[0]
    data.update(keys=stored, key_order=np.argsort(stored))
    with open(path, "wb") as f:
        np.savez(f, **data)
    names = prepare._resolve(work, len(chunks), keys, opts)
    assert names == ["aa", "bb", "cc", "ff"]
    check(names, [True, False])  # the chunk with "zz" is left to _assemble's string look-up


def test_paragraph_records_from_blocks_equal_the_line_loop():
    """_Reader._paragraphs (blocks of lines) against _Reader._text_records (one line at a time), with blocks
    as small as one character so that paragraphs, lines and \\r\\n cross block ends."""
    import io
    import random

    reader = prepare._Reader([], Options(text_docs="paragraph"))
    pieces = ["a", "b c", "\n", "\n\n", " \n", "\t\n", "\x1c", "\u00a0", "\u2028", "\r", "\r\n", "é", "  ", "x\x0by"]
    rng = random.Random(0)
    for _ in range(300):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 30)))
        for block_chars in (1, 3, 1 << 22):
            def stream():
                return io.TextIOWrapper(io.BytesIO(text.encode()), encoding="utf-8", newline=None)

            assert list(prepare._Reader._paragraphs(stream(), block_chars)) == list(reader._text_records(stream()))


def test_symbols_of_a_chunk_file_are_picked_from_its_joined_bytes():
    """_chunk_hits decodes only the symbols it needs, from the chunk file's newline-joined bytes."""
    import random

    rng = random.Random(3)
    for _ in range(200):
        symbols = ["".join(rng.choice("ab<>é\x00日x") for _ in range(rng.randint(1, 9))) for _ in range(rng.randint(1, 30))]
        raw = np.frombuffer("\n".join(symbols).encode("utf-8"), np.uint8)
        starts = np.concatenate(([0], np.flatnonzero(raw == 10) + 1))
        which = np.array(sorted(rng.sample(range(len(symbols)), rng.randint(0, len(symbols)))), np.int64)
        assert prepare._symbols_at(raw, starts, which) == [symbols[i] for i in which]
