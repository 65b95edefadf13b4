"""data_utils.py: corpora with the reference's ids, the token cache, iterators and their positions."""
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

import data_utils
import reference_rules as ref
from data_utils import LMOrderedIterator, LMShuffledIterator, SentenceData, get_lm_corpus, tokenize_raw
from utils.io.errors import UserError
from utils.data.vocabulary import BPEVocab, Vocab

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_splits(folder, texts, names=("train", "valid", "test")):
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in zip(names, texts):
        (folder / f"{name}.txt").write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    return folder


def word_text(rng, n_lines, vocab=40):
    return "".join(" ".join(f"w{int(rng.paretovariate(1.0)) % vocab}" for _ in range(rng.randint(0, 12))) + "\n"
                   for _ in range(n_lines))


def leftovers(cache_dir):
    """Folders below the cache roots: caches and temporary build folders (lock files are not folders)."""
    return sorted(str(p.relative_to(cache_dir)) for p in cache_dir.glob("*/*") if p.is_dir())


def batches(it):
    return [(d.clone(), t.clone(), n, w) for d, t, n, w in it]


def assert_same_batches(got, want):
    assert len(got) == len(want)
    for (d1, t1, n1, w1), (d2, t2, n2, w2) in zip(got, want):
        assert torch.equal(d1, d2) and torch.equal(t1, t2) and n1 == n2 and w1 == w2


# =============================================================================================================
# Acceptance 1: the real corpora give the reference's vocabulary sizes, token counts and ids
# =============================================================================================================
@pytest.fixture(scope="module")
def module_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.mark.parametrize(
    "folder, dataset, lower, counted, sizes",
    [
        ("wikitext-2", "wt2", False, ("train", "valid", "test"), (33278, 2088628, 217646, 245569)),
        ("ptb", "ptb", True, ("train", "valid", "test"), (10000, 929589, 73760, 82430)),
        ("ptb", "wt103", False, ("train",), (10000, 929589, 73760, 82430)),
    ],
)
def test_real_corpora_match_the_reference_rule(shared_dir, module_cache, folder, dataset, lower, counted, sizes):
    datadir = shared_dir / "data" / folder
    corpus = get_lm_corpus(datadir, dataset, cache_dir=module_cache, verbose=False)
    assert (len(corpus.vocab), len(corpus.train), len(corpus.valid), len(corpus.test)) == sizes
    # The rule (reference-inventory §5.1, §5.4): Counter over the counted files' whitespace tokens, <eos>
    # first, then by count with ties in first-seen order; each line's tokens followed by <eos>.
    idx2sym, _ = ref.build_vocab([datadir / f"{s}.txt" for s in counted], ["<eos>"], lower)
    assert corpus.vocab.idx2sym == idx2sym
    for split in ("train", "valid", "test"):
        head, tail = ref.encode_ends(datadir / f"{split}.txt", idx2sym, lower, 1000)
        got = getattr(corpus, split)
        assert got[:1000].tolist() == head
        assert got[-1000:].tolist() == tail


def test_wt103_mode_on_ptb_gives_the_reference_checkpoint_vocab(shared_dir, module_cache):
    from utils.io.checkpoint import load_checkpoint

    ref_vocab = load_checkpoint(shared_dir / "fixtures/reference-checkpoint/ptb_tiny_attn0.pt")["vocab"]
    corpus = get_lm_corpus(shared_dir / "data/ptb", "wt103", cache_dir=module_cache, verbose=False)
    assert corpus.vocab.idx2sym == ref_vocab["idx2sym"]
    assert Vocab.from_reference(ref_vocab).idx2sym == corpus.vocab.idx2sym


def test_wikitext103_without_train_split(shared_dir, tmp_path):
    with pytest.raises(UserError, match=r"wikitext-103/train\.txt: training split not found"):
        get_lm_corpus(shared_dir / "data/wikitext-103", "wt103", cache_dir=tmp_path, verbose=False)
    assert leftovers(tmp_path) == []


# =============================================================================================================
# Datasets and cache on generated corpora
# =============================================================================================================
@pytest.fixture
def wt_dir(tmp_path):
    rng = random.Random(0)
    return write_splits(tmp_path / "data", [word_text(rng, 300), word_text(rng, 40), word_text(rng, 40)])


def test_cache_is_built_once_then_memory_mapped(wt_dir, tmp_path, capsys):
    cache = tmp_path / "cache"
    first = get_lm_corpus(wt_dir, "wt2", cache_dir=cache)
    assert "Producing dataset wt2..." in capsys.readouterr().out
    again = get_lm_corpus(wt_dir, "wt2", cache_dir=cache)
    assert capsys.readouterr().out.strip() == "Loading cached dataset..."
    assert isinstance(again.train, np.memmap) and again.train.dtype == np.uint8  # 40 words + <eos>
    assert again.vocab.idx2sym == first.vocab.idx2sym and np.array_equal(again.train, first.train)
    entry = cache / os.listdir(cache)[0] / again.cache_path.name
    assert sorted(p.name for p in entry.iterdir()) == ["meta.json", "test.npy", "train.npy", "valid.npy", "vocab.json"]
    assert np.array_equal(np.load(entry / "valid.npy"), first.valid)  # plain .npy files
    meta = json.loads((entry / "meta.json").read_text())
    assert meta["version"] == data_utils.CACHE_VERSION and {s["path"] for s in meta["sources"]} == {
        "train.txt", "valid.txt", "test.txt"}


@pytest.mark.parametrize("dataset, options", [("wt2", {}), ("custom", {"min_freq": 3}), ("custom", {"max_size": 5})])
def test_the_corpus_a_build_returns_is_the_cache_loaded_again(wt_dir, tmp_path, dataset, options):
    """The build opens what it wrote without reading it back (the manifest comes from the writers): the same
    corpus as a later load, which checks every file against that manifest; <unk> stands for dropped words."""
    built = get_lm_corpus(wt_dir, dataset, cache_dir=tmp_path / "cache", verbose=False, **options)
    loaded = get_lm_corpus(wt_dir, dataset, cache_dir=tmp_path / "cache", verbose=False, **options)
    assert built.vocab.to_dict() == loaded.vocab.to_dict() and built.vocab.fingerprint() == loaded.vocab.fingerprint()
    assert built.vocab.counter == loaded.vocab.counter == {}  # (the counts are not part of the cache)
    assert built.meta == loaded.meta == json.loads((built.cache_path / "meta.json").read_text())
    special = ["<eos>", "<unk>"] if options else ["<eos>"]
    paths = [wt_dir / f"{split}.txt" for split in ("train", "valid", "test")]
    assert built.vocab.idx2sym == ref.build_vocab(paths, special, False, options.get("min_freq", 0),
                                                  options.get("max_size"))[0]
    for split in ("train", "valid", "test"):
        got, want = getattr(built, split), getattr(loaded, split)
        assert isinstance(got, np.memmap) and got.dtype == want.dtype and np.array_equal(got, want)
        assert built.meta["manifest"][f"{split}.npy"]["max_id"] == int(want.max())
        expected = ref.encode(wt_dir / f"{split}.txt", loaded.vocab.idx2sym, False, add_eos=True)
        assert got.tolist() == expected
    vocab_bytes = (built.cache_path / "vocab.json").read_bytes()
    assert built.meta["manifest"]["vocab.json"] == {"bytes": len(vocab_bytes),
                                                    "sha256": __import__("hashlib").sha256(vocab_bytes).hexdigest()}


def test_cache_in_the_data_folder_by_default(wt_dir, capsys):
    get_lm_corpus(wt_dir, "wt2", verbose=False)
    assert len(list((wt_dir / ".txl_cache").glob("wt2-word-*/train.npy"))) == 1


def test_cache_is_rebuilt_when_a_source_changes(wt_dir, tmp_path, capsys):
    cache = tmp_path / "cache"
    get_lm_corpus(wt_dir, "wt2", cache_dir=cache, verbose=False)
    (wt_dir / "valid.txt").write_text("w1 w2 brandnew\n")
    corpus = get_lm_corpus(wt_dir, "wt2", cache_dir=cache)
    out = capsys.readouterr().out
    assert "Source files changed" in out and "valid.txt" in out and "Producing dataset" in out
    assert corpus.vocab.get_symbols(corpus.valid) == ["w1", "w2", "brandnew", "<eos>"]
    assert len(leftovers(cache)) == 1


def test_cache_of_another_version_is_an_error(wt_dir, tmp_path):
    cache = tmp_path / "cache"
    corpus = get_lm_corpus(wt_dir, "wt2", cache_dir=cache, verbose=False)
    meta_file = corpus.cache_path / "meta.json"
    meta = json.loads(meta_file.read_text())
    meta["version"] = data_utils.CACHE_VERSION + 1
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(UserError, match=r"meta\.json: dataset cache written by another version.*delete .* to rebuild"):
        get_lm_corpus(wt_dir, "wt2", cache_dir=cache, verbose=False)
    assert len(leftovers(cache)) == 1  # only the (untouched) old cache


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", r"test\.txt: test split not found; a wt2 folder needs train\.txt, valid\.txt and test\.txt"),
        ("empty", r"valid\.txt: validation split is empty"),
        ("blank", r"valid\.txt: valid split has no tokens"),
        ("undecodable", r"train\.txt: line 3, byte offset \d+: invalid UTF-8 byte\(s\) ff"),
        ("unknown word", r"valid\.txt: line 2: 'zebra' is not in the vocabulary, which has no <unk>"),
    ],
)
def test_bad_input_one_clear_line_and_no_partial_cache(tmp_path, case, message):
    data = write_splits(tmp_path / "data", ["a b\nb c\n", "a\nc\n", "b\n"])
    dataset = "wt2"
    if case == "missing":
        (data / "test.txt").unlink()
    elif case == "empty":
        (data / "valid.txt").write_bytes(b"")
    elif case == "blank":
        (data / "valid.txt").write_bytes(b"  \n\n")
        dataset = "enwik8"  # no <eos>: a blank file has no tokens at all
    elif case == "undecodable":
        (data / "train.txt").write_bytes(b"a b\n" * 2 + b"b \xff c\n" + b"a\n" * 100)
    elif case == "unknown word":
        (data / "valid.txt").write_text("a\nb zebra\n")
        dataset = "wt103"  # vocabulary from train.txt only, and it has no <unk>
    cache = tmp_path / "cache"
    with pytest.raises(UserError, match=message) as err:
        get_lm_corpus(data, dataset, cache_dir=cache, verbose=False)
    assert "\n" not in str(err.value)
    assert leftovers(cache) == []


def test_cli_shows_one_line(tmp_path):
    data = write_splits(tmp_path / "data", ["a\n", "a\n"], names=("train", "valid"))
    code = (
        "import sys; from utils.io.errors import run_cli; from data_utils import get_lm_corpus; "
        f"run_cli(lambda: get_lm_corpus({str(data)!r}, 'wt2', cache_dir={str(tmp_path / 'c')!r}) and 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ") and "test.txt" in proc.stderr


def test_reference_datasets_refuse_custom_options(wt_dir, tmp_path):
    with pytest.raises(UserError, match="--lower_case applies to --dataset custom only"):
        get_lm_corpus(wt_dir, "wt2", cache_dir=tmp_path, lower_case=True)
    with pytest.raises(UserError, match="unknown dataset 'wt3'"):
        get_lm_corpus(wt_dir, "wt3", cache_dir=tmp_path)
    with pytest.raises(UserError, match="data folder not found"):
        get_lm_corpus(tmp_path / "nowhere", "wt2", cache_dir=tmp_path)


def test_char_datasets_enwik8_text8(tmp_path):
    rng = random.Random(3)
    texts = [" ".join(rng.choice("abcXY_") for _ in range(n)) + "\n" for n in (500, 60, 60)]
    texts[0] = texts[0] + "7 8\n\n9\n"
    data = write_splits(tmp_path / "text8", texts)
    corpus = get_lm_corpus(data, "text8", cache_dir=tmp_path / "c", verbose=False)
    paths = [data / f"{s}.txt" for s in ("train", "valid", "test")]
    idx2sym, _ = ref.build_vocab(paths, [], lower_case=True)  # lower-cased, no <eos>, all three files
    assert corpus.vocab.idx2sym == idx2sym and corpus.train.dtype == np.uint8
    assert corpus.train.tolist() == ref.encode(paths[0], idx2sym, True, add_eos=False)


@pytest.mark.parametrize("level", ["word", "char"])
def test_custom_dataset(tmp_path, level):
    texts = ["Hello world\nhello  again\n", "Hello you\n", "world\n"]
    data = write_splits(tmp_path / "mine", texts)
    corpus = get_lm_corpus(data, "custom", cache_dir=tmp_path / "c", custom_level=level, verbose=False)
    delimiter = "" if level == "char" else None
    paths = [data / f"{s}.txt" for s in ("train", "valid", "test")]
    idx2sym, _ = ref.build_vocab(paths, ["<eos>"], False, delimiter=delimiter)
    assert corpus.vocab.idx2sym == idx2sym
    assert corpus.valid.tolist() == ref.encode(paths[1], idx2sym, False, delimiter=delimiter)


def test_custom_dataset_options(tmp_path):
    data = write_splits(tmp_path / "mine", ["A a a b b c\n", "a d\n", "a\n"])
    corpus = get_lm_corpus(data, "custom", cache_dir=tmp_path / "c", lower_case=True, min_freq=2, verbose=False)
    assert corpus.vocab.idx2sym == ["<eos>", "<unk>", "a", "b"]
    assert corpus.vocab.get_symbols(corpus.valid) == ["a", "<unk>", "<eos>"]
    with pytest.raises(UserError, match="--custom_level must be word or char"):
        get_lm_corpus(data, "custom", cache_dir=tmp_path / "c", custom_level="byte")


def test_bpe_corpus_trained_offline_and_loaded(wt_dir, tmp_path):
    corpus = get_lm_corpus(wt_dir, "wt2", "bpe", cache_dir=tmp_path / "c", bpe_vocab_size=300, verbose=False)
    assert isinstance(corpus.vocab, BPEVocab) and len(corpus.vocab) % 8 == 0
    text = (wt_dir / "valid.txt").read_text()
    assert corpus.valid.tolist() == corpus.vocab.tokenizer.encode(text).ids + [corpus.vocab.eot_idx]
    assert np.array_equal(data_utils.encode_split(wt_dir, "wt2", "valid", corpus.vocab), corpus.valid)  # eval.py's path
    model = tmp_path / "tok"
    model.mkdir()
    corpus.vocab.tokenizer.model.save(str(model))
    loaded = get_lm_corpus(wt_dir, "wt2", "bpe", cache_dir=tmp_path / "c", bpe_model=model, verbose=False)
    assert np.array_equal(loaded.valid, corpus.valid) and loaded.cache_path != corpus.cache_path
    with pytest.raises(UserError, match="--vocab bpe works on word-level text"):
        get_lm_corpus(wt_dir, "enwik8", "bpe", cache_dir=tmp_path / "c")


@pytest.fixture
def lm1b_dir(tmp_path):
    rng = random.Random(5)
    root = tmp_path / "one-billion-words"
    shards = root / data_utils.LM1B_TRAIN_GLOB.rsplit("/", 1)[0]
    shards.mkdir(parents=True)
    for i in range(3):
        (shards / f"news.en-0000{i + 1}-of-00100").write_text(word_text(rng, 80, vocab=60).replace("\n\n", "\n"))
    words = "\n".join(f"w{i} {100 - i}" for i in range(50))  # w50 .. w59 stay unknown
    (root / "1b_word_vocab.txt").write_text(f"<S> 0\n</S> 0\n<UNK> 0\n{words}\n")
    (root / "valid.txt").write_text(word_text(rng, 30, vocab=60))
    (root / "test.txt").write_text(word_text(rng, 30, vocab=60))
    return root


def test_lm1b_vocab_file_sentences_and_iterators(lm1b_dir, tmp_path):
    corpus = get_lm_corpus(lm1b_dir, "lm1b", cache_dir=tmp_path / "c", verbose=False)
    vocab = corpus.vocab
    assert vocab.idx2sym[:4] == ["<S>", "</S>", "<UNK>", "w0"] and len(vocab) == 53
    shard_paths = sorted((lm1b_dir / data_utils.LM1B_TRAIN_GLOB.rsplit("/", 1)[0]).iterdir())
    want = [ref.encode(p, vocab.idx2sym, False, add_eos=False, add_double_eos=True, unk="<UNK>") for p in shard_paths]
    assert corpus.train.tokens.tolist() == [i for ids in want for i in ids]
    assert len(corpus.train.shards) == 4 and corpus.train[0].tolist()[0] == 0 and corpus.train[0].tolist()[-1] == 0
    assert corpus.valid.tokens.tolist() == ref.encode(lm1b_dir / "valid.txt", vocab.idx2sym, False, False, True, unk="<UNK>")
    # the reference's lm1b path crashed on mem_len and 3-tuples; here the same call as for the other datasets works
    it = corpus.get_iterator("valid", 4, 8, mem_len=16, ext_len=0)
    first = next(iter(it))
    assert len(first) == 4 and first[0].shape == (8, 4) and first[3] is True
    train = corpus.get_iterator("train", 4, 8, rank=1, world_size=2)
    data, target, seq_len, warm = next(iter(train))
    assert data.shape == (8, 2) and seq_len == 8


# =============================================================================================================
# Acceptance 2: iterators on generated data
# =============================================================================================================
ORDERED_CASES = [
    # n_tokens, bsz, bptt, mem_len, ext_len, warmup, world_size
    (1000, 4, 7, None, 0, True, 1),
    (1003, 5, 16, None, 3, True, 1),
    (1000, 4, 8, 20, 0, True, 1),
    (997, 6, 10, 25, 4, True, 3),
    (1000, 4, 8, 20, 0, False, 2),
    (500, 7, 9, 9, 0, True, 2),  # 7 columns over 2 ranks: 4 + 3, as torch.chunk splits them
]


@pytest.mark.parametrize("n, bsz, bptt, mem_len, ext_len, warmup, world", ORDERED_CASES)
def test_ordered_iterator_matches_the_reference(n, bsz, bptt, mem_len, ext_len, warmup, world):
    ids = np.arange(n)  # every token names its position
    for rank in range(world):
        ours = LMOrderedIterator(ids, bsz, bptt, mem_len=mem_len, ext_len=ext_len, warmup=warmup, rank=rank,
                                 world_size=world)
        theirs = ref.OrderedIterator(ids, bsz, bptt, mem_len, ext_len, warmup, rank, world)
        got = batches(ours)
        assert_same_batches(got, list(theirs.batches()))
        assert ours.n_batch == -(-theirs.data.size(0) // bptt)
        for data, target, seq_len, _ in got:
            assert data.dtype == torch.int64 and data.shape[0] <= seq_len + ext_len and target.shape[0] == seq_len


def test_targets_are_the_next_tokens_and_shapes():
    it = LMOrderedIterator(np.arange(1000), bsz=4, bptt=10)
    for data, target, seq_len, warm in it:
        assert data.shape == target.shape == (seq_len, 4) and warm
        assert torch.equal(target, data + 1)  # streams are contiguous pieces of the corpus
    assert it.last_iter == 240 and it.n_batch == 25


def test_warmup_rows_are_excluded_and_every_token_is_scored_once():
    n, bsz, bptt, mem_len = 1000, 4, 8, 20
    it = LMOrderedIterator(np.arange(n), bsz, bptt, mem_len=mem_len)
    assert it.warmup_batches == 3 and it.warmup_elems == 24
    scored, warmup_batches = [], 0
    for data, target, seq_len, warm in it:
        if warm:
            scored.append(target)
        else:
            warmup_batches += 1
            assert torch.equal(target[:, 1:], data[:, 1:] + 1)
    assert warmup_batches == 3
    scored = torch.cat(scored)
    step = n // bsz
    for b in range(bsz):  # stream b's tokens 1 .. end, each once, in order
        assert scored[:, b].tolist() == list(range(b * step + 1, (b + 1) * step))
    first = next(iter(it))[0]
    assert first[0, 0].item() == bsz * step - 24 and first[0, 1].item() == step - 24  # previous stream's tail


def test_rank_split_is_a_column_chunk_of_the_global_batch():
    ids = np.random.default_rng(0).integers(0, 50, 2000)
    whole = batches(LMOrderedIterator(ids, 6, 12, mem_len=12))
    parts = [batches(LMOrderedIterator(ids, 6, 12, mem_len=12, rank=r, world_size=3)) for r in range(3)]
    for k, (data, target, seq_len, warm) in enumerate(whole):
        assert torch.equal(torch.cat([p[k][0] for p in parts], 1), data)
        assert torch.equal(torch.cat([p[k][1] for p in parts], 1), target)
        assert all(p[k][3] == warm for p in parts)
    with pytest.raises(UserError, match="leaves rank 3 of 4 nothing"):
        LMOrderedIterator(ids, 6, 12, rank=3, world_size=4)


def test_roll_is_a_pure_function_of_seed_and_epoch():
    ids = np.arange(3000)
    fresh = LMOrderedIterator(ids, 5, 16)
    fresh.roll(1111, 3)
    want = batches(fresh)
    walked = LMOrderedIterator(ids, 5, 16)
    for epoch in (1, 2, 3):  # the reference's uninterrupted run rolls cumulatively; ours does not
        walked.roll(1111, epoch)
        got = batches(walked)
    assert_same_batches(got, want)
    # the first roll equals the reference's roll(seed + epoch) on unrolled data
    theirs = ref.OrderedIterator(ids, 5, 16)
    theirs.roll(1111 + 3)
    assert_same_batches(want, list(theirs.batches()))
    # rolled rank parts are the columns of the rolled global batch
    parts = []
    for r in range(5):
        part = LMOrderedIterator(ids, 5, 16, rank=r, world_size=5)
        part.roll(1111, 3)
        parts.append(batches(part))
    assert all(torch.equal(torch.cat([p[k][0] for p in parts], 1), want[k][0]) for k in range(len(want)))
    other = LMOrderedIterator(ids, 5, 16)
    other.roll(1111, 4)
    assert not torch.equal(batches(other)[0][0], want[0][0])


@pytest.mark.parametrize("varlen, rolled, mem_len, ext_len", [
    (False, False, None, 0), (False, True, None, 5), (True, False, None, 0), (True, True, None, 2),
    (False, False, 30, 0),
])
def test_position_save_and_restore_gives_the_identical_next_batch(varlen, rolled, mem_len, ext_len):
    ids = np.random.default_rng(1).integers(0, 100, 5000)

    def make():
        it = LMOrderedIterator(ids, 4, 20, mem_len=mem_len, ext_len=ext_len, varlen=varlen, seed=7)
        if rolled:
            it.roll(7, 2)
        else:
            it.set_epoch(2)
        return it

    reference = batches(make())
    for stop in (1, 5, len(reference) - 1):
        it = make()
        stream = iter(it)
        for _ in range(stop):
            next(stream)
        state = json.loads(json.dumps(it.state_dict()))  # plain types
        resumed = LMOrderedIterator(ids, 4, 20, mem_len=mem_len, ext_len=ext_len, varlen=varlen, seed=0)
        resumed.load_state_dict(state)
        assert resumed.state_dict() == state
        assert_same_batches(batches(resumed), reference[stop:])
        assert resumed.state_dict()["pos"] == 0  # the pass ended: the next one starts over
    bad = LMOrderedIterator(ids, 8, 20)
    with pytest.raises(UserError, match="cannot resume the data stream: it was saved with bsz=4, this run has 8"):
        bad.load_state_dict(state)


def test_reference_start_semantics_and_new_passes_start_over():
    it = LMOrderedIterator(np.arange(400), 2, 10)
    all_batches = batches(it)
    resumed = batches(it.get_fixlen_iter(start=50))  # start = last_iter of an interrupted run
    assert_same_batches(resumed, all_batches[6:])
    stream = iter(it)
    next(stream)
    next(stream)  # an abandoned pass (e.g. eval_max_steps) ...
    assert_same_batches(batches(it), all_batches)  # ... does not move where the next pass starts


def test_varlen_yields_four_tuples_covering_the_data_reproducibly():
    ids = np.arange(4000)
    it = LMOrderedIterator(ids, 4, 30, varlen=True, seed=3)
    got = batches(it)
    pos = 0
    for data, target, seq_len, warm in got:
        assert 5 <= seq_len <= 45 and data.shape == (seq_len, 4) and warm
        assert data[0, 0].item() == pos and torch.equal(target, data + 1)
        pos += seq_len
    assert pos == 999 and len({n for _, _, n, _ in got}) > 3
    again = LMOrderedIterator(ids, 4, 30, varlen=True, seed=3)
    assert_same_batches(batches(again), got)
    next_epoch = batches(it)  # epoch advanced: other lengths
    assert [n for *_, n, _ in next_epoch] != [n for *_, n, _ in got]


def test_iterator_from_a_tensor_for_manual_text():
    it = LMOrderedIterator(torch.tensor([5, 6, 7, 8, 9]), bsz=1, bptt=3, ext_len=2, warmup=False)
    got = [(d.flatten().tolist(), t.flatten().tolist(), n) for d, t, n, _ in it]
    assert got == [([5, 6, 7], [6, 7, 8], 3), ([6, 7, 8], [9], 1)]
    with pytest.raises(UserError, match="too few"):
        LMOrderedIterator(torch.tensor([5]), bsz=1, bptt=3)


def test_corpus_iterator_larger_than_a_block_and_memory_mapped(wt_dir, tmp_path):
    corpus = get_lm_corpus(wt_dir, "wt2", cache_dir=tmp_path / "c", verbose=False)
    it = corpus.get_iterator("train", 4, 16, device="cpu")
    data, target, seq_len, warm = next(iter(it))
    step = len(corpus.train) // 4
    assert data[:, 1].tolist() == corpus.train[step : step + 16].tolist()
    ev = corpus.get_iterator("valid", 2, 8, mem_len=16)
    assert ev.warmup_elems == 16 and sum(1 for b in ev if not b[3]) == 2


# ---- shuffled (sentence) iterator ------------------------------------------------------------------------------
def reference_stream(sentences, bsz, bptt, ext_len=0):
    """The reference's LMShuffledIterator.stream_iterator on a sentence list (no shuffle), written from §5.3."""
    sent_stream = iter(torch.as_tensor(s, dtype=torch.long) for s in sentences)
    streams = [None] * bsz
    data = torch.full((bptt, bsz), -1, dtype=torch.long)
    target = torch.full((bptt, bsz), -1, dtype=torch.long)
    n_retain = 0
    out = []
    while True:
        data[n_retain:].fill_(-1)
        target.fill_(-1)
        try:
            for i in range(bsz):
                n_filled = 0
                while n_filled < bptt:
                    if streams[i] is None or len(streams[i]) <= 1:
                        streams[i] = next(sent_stream)
                    n_new = min(len(streams[i]) - 1, bptt - n_filled)
                    data[n_retain + n_filled : n_retain + n_filled + n_new, i] = streams[i][:n_new]
                    target[n_filled : n_filled + n_new, i] = streams[i][1 : n_new + 1]
                    streams[i] = streams[i][n_new:]
                    n_filled += n_new
        except StopIteration:
            return out
        out.append((data.clone(), target.clone()))
        n_retain = min(data.size(0), ext_len)
        if n_retain > 0:
            data[:n_retain] = data[-n_retain:].clone()
        data.resize_(n_retain + bptt, data.size(1))


def random_sentences(seed, n=200):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 1000, rng.integers(1, 30)) for _ in range(n)]


@pytest.mark.parametrize("ext_len", [0, 3])
def test_shuffled_iterator_matches_the_reference_fill(ext_len):
    sents = random_sentences(0)
    want = reference_stream(sents, 5, 12, ext_len)
    got = list(LMShuffledIterator(sents, 5, 12, ext_len=ext_len))
    assert len(got) == len(want) > 5
    for (d, t, n, w), (rd, rt) in zip(got, want):
        assert torch.equal(d, rd) and torch.equal(t, rt) and n == 12 and w is True


def test_shuffled_iterator_rank_split_shuffle_and_resume():
    sents = random_sentences(1, 400)
    data = SentenceData.from_sentences(sents)
    data.shards = np.array([0, 150, 260, 400])  # three source files
    whole = batches(LMShuffledIterator(data, 6, 10, shuffle=True, seed=4))
    parts = [batches(LMShuffledIterator(data, 6, 10, shuffle=True, seed=4, rank=r, world_size=2)) for r in (0, 1)]
    assert all(torch.equal(torch.cat([parts[0][k][0], parts[1][k][0]], 1), whole[k][0]) for k in range(len(whole)))
    unshuffled = batches(LMShuffledIterator(data, 6, 10))
    assert not torch.equal(whole[0][0], unshuffled[0][0])

    it = LMShuffledIterator(data, 6, 10, ext_len=2, shuffle=True, seed=4)
    it.set_epoch(3)
    reference = batches(it)
    it.set_epoch(3)
    stream = iter(it)
    for _ in range(4):
        next(stream)
    state = json.loads(json.dumps(it.state_dict()))
    resumed = LMShuffledIterator(data, 6, 10, ext_len=2, shuffle=True)
    resumed.load_state_dict(state)
    assert_same_batches(batches(resumed), reference[4:])
    again = LMShuffledIterator(data, 6, 10, ext_len=2, shuffle=True, seed=4)
    again.set_epoch(3)
    assert_same_batches(batches(again.get_fixlen_iter(start=3)), reference[4:])


# =============================================================================================================
# Concurrency, raw text
# =============================================================================================================
@pytest.mark.slow
def test_concurrent_processes_build_the_cache_once(wt_dir, tmp_path):
    code = (
        "import sys; from data_utils import get_lm_corpus; "
        f"c = get_lm_corpus({str(wt_dir)!r}, 'wt2', cache_dir={str(tmp_path / 'c')!r}); print(len(c.train))"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate()[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sum(o.count("Producing dataset") for o in outs) == 1
    assert len({o.strip().splitlines()[-1] for o in outs}) == 1
    assert len(leftovers(tmp_path / "c")) == 1


def test_tokenize_raw_like_wikitext():
    out = tokenize_raw('He said "it\'s 3.5 or 1,000 well-known"')
    assert out == 'He said " it \'s 3 @.@ 5 or 1 @,@ 000 well @-@ known "'
