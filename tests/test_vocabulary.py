"""utils/data/vocabulary.py: the reference's word-vocabulary rules, encoding, errors, JSON form, BPE."""
import json
import random

import numpy as np
import pytest

import reference_rules as ref
import utils.data.fast_words as fast_words
import utils.data.vocabulary as vocabulary
from utils.data.fast_words import scan_words
from utils.io.errors import UserError
from utils.data.vocabulary import BPEVocab, Vocab

# Whitespace that str.split() splits on besides ' ' and '\t', and line ends of every kind.
ODD_SPACES = ["\xa0", "\x0b", "\x0c", "\x1c", "\x1f", "\x85", "\u2028", "\u3000"]
WORDS = ["the", "The", "cat", "ΟΔΟΣ", "İstanbul", "naïve", "N", "<unk>", "<eos>", "a.b", "x", "@-@", "日本"]
# Words of 8, 9, 16 and 17+ bytes (the fast path reads tokens 8 bytes at a time), a NUL inside a word, and
# only the ASCII whitespace (the fast path leaves blocks with non-ASCII whitespace to the Python path).
LONG_WORDS = WORDS + ["abcdefgh", "abcdefghi", "abcdefgh\x00", "abcdefghijklmnop", "abcdefghijklmnopq",
                      "日本語日本語日本", "supercalifragilisticexpialidocious", "a\x00b", "\x00", "abcdefga", "abcdefgi",
                      "abcdefg", "abcdefg\x0f"]
ASCII_SPACES = ["\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x1f"]


def random_corpus(rng: random.Random, n_lines: int, words=WORDS, odd_spaces=ODD_SPACES) -> str:
    lines = []
    for _ in range(n_lines):
        n = rng.choice([0, 0, 1, 3, 8, 20])
        parts = []
        for _ in range(n):
            parts.append(rng.choice(words) if rng.random() < 0.7 else f"w{int(rng.paretovariate(1.2))}")
            parts.append(rng.choice([" ", " ", " ", "  ", "\t"] + odd_spaces))
        lead = rng.choice(["", " ", "\t ", odd_spaces[0]])
        lines.append(lead + "".join(parts) + rng.choice(["\n", "\n", "\r\n", "\r", " \n"]))
    text = "".join(lines)
    return text if rng.random() < 0.5 else text.rstrip("\n\r")  # sometimes no final newline


@pytest.fixture
def small_chunks(monkeypatch):
    """Tiny read blocks, so block boundaries, long-line cuts and CR LF across reads are exercised."""
    monkeypatch.setattr(vocabulary, "_CHUNK_CHARS", 7)


def write(path, text):
    path.write_bytes(text.encode("utf-8"))
    return path


# ---- tokenize ------------------------------------------------------------------------------------------------
def test_tokenize_rules():
    v = Vocab(lower_case=True)
    assert v.tokenize("  The Cat\tSAT \n") == ["the", "cat", "sat"]
    assert v.tokenize("The Cat", add_eos=True) == ["the", "cat", "<eos>"]
    assert v.tokenize("The Cat", add_double_eos=True) == ["<S>", "the", "cat", "<S>"]
    assert v.tokenize("   \n", add_eos=True) == ["<eos>"]
    assert Vocab(lower_case=False).tokenize("The Cat") == ["The", "Cat"]
    assert Vocab(lower_case=False, delimiter="").tokenize(" ab c ", add_eos=True) == ["a", "b", " ", "c", "<eos>"]


# ---- build + encode against the plain rule ------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("ascii_spaces", [False, True], ids=["odd_spaces", "ascii_spaces"])
def test_build_and_encode_match_the_reference_rule(tmp_path, seed, chunked, ascii_spaces, request, monkeypatch):
    if chunked:
        request.getfixturevalue("small_chunks")
    fast = []  # blocks the numpy path (utils/data/fast_words.py) numbered; None: left to the Python path
    monkeypatch.setattr(vocabulary, "scan_words", lambda text: fast.append(scan_words(text)) or fast[-1])
    rng = random.Random(seed)
    corpus = (lambda: random_corpus(rng, 60, LONG_WORDS, ASCII_SPACES)) if ascii_spaces else (lambda: random_corpus(rng, 60))
    paths = [write(tmp_path / f"{s}.txt", corpus()) for s in ("train", "valid", "test")]
    lower = seed % 2 == 0
    special = ["<eos>"] if seed % 3 else ["<eos>", "<unk>"]
    min_freq, max_size = (2, 40) if seed >= 4 else (0, None)
    expected, counter = ref.build_vocab(paths, special, lower, min_freq, max_size)

    v = Vocab(special=special, lower_case=lower, min_freq=min_freq, max_size=max_size).build(paths)
    assert v.idx2sym == expected
    assert list(v.counter.items()) == list(counter.items())  # same counts, same first-seen order
    for path in paths:
        want = ref.encode(path, expected, lower, add_eos=True)
        if "<unk>" in expected or not min_freq:
            assert v.encode_file(path).tolist() == want
            assert v.encode_file(path, add_eos=False).tolist() == ref.encode(path, expected, lower, add_eos=False)

    # the one-read path of the data cache: provisional ids kept while counting, remapped afterwards
    one = Vocab(special=special, lower_case=lower, min_freq=min_freq, max_size=max_size)
    blocks = {p: [] for p in paths}
    for path in paths:
        one.count_file(path, sink=blocks[path].append)
    one.build_vocab()
    assert one.idx2sym == expected
    if "<unk>" in expected or not min_freq:
        for path in paths:
            got = np.concatenate([ids for ids, _ in one.finish_provisional(blocks[path], path)])
            assert got.tolist() == ref.encode(path, expected, lower, add_eos=True)
            # the cache build's single gather (no line starts wanted), into the file's dtype
            fast = [ids for ids, starts in one.finish_provisional(blocks[path], path, starts=False, dtype=np.uint16)]
            assert all(ids.dtype == np.uint16 for ids in fast) and np.concatenate(fast).tolist() == got.tolist()
    if ascii_spaces:  # the numpy path numbered every block
        assert fast and all(f is not None for f in fast)


def test_a_hash_collision_falls_back_to_the_python_path(tmp_path, monkeypatch):
    """Exactness does not rest on the hash: with every token hashed alike the check against each group's first
    token fails, the block goes to the Python path, and the ids still follow the rule."""
    monkeypatch.setattr(fast_words, "_mix", lambda x: x & np.uint64(0))
    symbols, ids = fast_words.first_seen_ids("b a b\n")  # up to 7 bytes a token is its own key: no hash
    assert symbols == ["b", "a"] and ids.tolist() == [0, 1, 0, -2]
    assert fast_words.first_seen_ids("abcdefgh abcdefgi\n") is None  # longer ones: checked on their first 8 bytes
    assert fast_words.first_seen_ids("abcdefghij abcdefghik\n") is None  # and on the bytes after those
    path = write(tmp_path / "t.txt", "b a b\nabcdefghij abcdefghik a\n")
    expected, _ = ref.build_vocab([path], ["<eos>"], False)
    v = Vocab(special=["<eos>"], lower_case=False).build([path])
    assert v.idx2sym == expected
    assert v.encode_file(path).tolist() == ref.encode(path, expected, False, add_eos=True)


def test_symbols_known_by_key_across_blocks_are_checked_byte_for_byte(tmp_path, monkeypatch, small_chunks):
    """A later block's symbols are found by key in the counting table's KeyTable (not decoded); with every long
    token hashed alike, a key found with other bytes (another length, or other bytes after the first 8) is
    treated as not found and looked up by its string, and the ids and counts still follow the rule."""
    monkeypatch.setattr(fast_words, "_mix", lambda x: x & np.uint64(0))
    lines = ["abcdefghij", "abcdefghik", "abcdefghij b", "abcdefghijk", "abcdefghik a", "abcdefgh", "b abcdefgh"]
    path = write(tmp_path / "t.txt", "\n".join(lines) + "\n")  # (blocks of 7 characters: about a line each)
    decoded = []
    real = fast_words.WordBlock.decode
    monkeypatch.setattr(fast_words.WordBlock, "decode", lambda self, which: decoded.extend(real(self, which)) or real(self, which))
    expected, counter = ref.build_vocab([path], ["<eos>"], False)
    v = Vocab(special=["<eos>"], lower_case=False).build([path])
    assert v.idx2sym == expected and list(v.counter.items()) == list(counter.items())
    assert v.encode_file(path).tolist() == ref.encode(path, expected, False, add_eos=True)
    one = Vocab(special=["<eos>"], lower_case=False)
    one.count_file(path)
    assert list(one.counter.items()) == list(counter.items())
    assert sorted(set(decoded)) == sorted(counter)


def test_a_later_block_decodes_only_its_new_symbols(tmp_path, monkeypatch, small_chunks):
    path = write(tmp_path / "t.txt", "ab abcdefghijk\n" * 5 + "ab x\n")  # (blocks of 7 characters)
    decoded = []
    real = fast_words.WordBlock.decode
    monkeypatch.setattr(fast_words.WordBlock, "decode", lambda self, which: decoded.extend(real(self, which)) or real(self, which))
    v = Vocab(special=["<eos>"], lower_case=False)
    v.count_file(path)
    assert sorted(decoded) == ["ab", "abcdefghijk", "x"]  # each once: found by key in the later blocks
    assert list(v.counter.items()) == [("ab", 6), ("abcdefghijk", 5), ("x", 1)]


def test_char_level_matches_the_rule(tmp_path, small_chunks):
    rng = random.Random(7)
    paths = [write(tmp_path / f"{s}.txt", random_corpus(rng, 40)) for s in ("train", "valid")]
    expected, _ = ref.build_vocab(paths, ["<eos>"], False, delimiter="")
    v = Vocab(special=["<eos>"], lower_case=False, delimiter="").build(paths)
    assert v.idx2sym == expected
    assert v.encode_file(paths[1]).tolist() == ref.encode(paths[1], expected, False, delimiter="")
    assert v.convert_to_sent(v.encode("ab c")) == "ab c"


def test_double_eos_sentences(tmp_path):
    path = write(tmp_path / "s.txt", "a b\n\nc\n")
    v = Vocab(special=["<S>"], lower_case=False).build([path])
    ids = v.encode_file(path, add_double_eos=True)
    assert v.get_symbols(ids) == ["<S>", "a", "b", "<S>", "<S>", "<S>", "<S>", "c", "<S>"]
    sents = v.encode_file(path, ordered=False, add_double_eos=True)
    assert [v.get_symbols(s) for s in sents] == [["<S>", "a", "b", "<S>"], ["<S>", "<S>"], ["<S>", "c", "<S>"]]


def test_special_symbol_in_text_is_not_duplicated(tmp_path):
    path = write(tmp_path / "t.txt", "b <eos> b a\n")
    v = Vocab(special=["<eos>"], lower_case=False).build([path])
    assert v.idx2sym == ["<eos>", "b", "a"]


# ---- unknown words -------------------------------------------------------------------------------------------
def test_unknown_words_map_to_unk_or_fail_with_file_and_line(tmp_path):
    train = write(tmp_path / "train.txt", "a b <unk>\nb\n")
    other = write(tmp_path / "valid.txt", "a\nb zebra b\n")
    with_unk = Vocab(special=["<eos>"], lower_case=False).build([train])
    assert with_unk.get_idx("zebra") == with_unk.sym2idx["<unk>"]
    assert with_unk.encode_file(other).tolist() == with_unk.get_indices(["a", "<eos>", "b", "<unk>", "b", "<eos>"])

    no_unk = Vocab(special=["<eos>"], lower_case=False).build([write(tmp_path / "t2.txt", "a b\n")])
    with pytest.raises(UserError, match=r"valid\.txt: line 2: 'zebra' is not in the vocabulary.*no <unk>"):
        no_unk.encode_file(other)
    with pytest.raises(UserError, match="'zebra' is not in the vocabulary"):
        no_unk.get_idx("zebra")


def test_dropped_word_without_unk_names_file_and_line(tmp_path):
    path = write(tmp_path / "train.txt", "a a a\nb a\n")
    v = Vocab(special=["<eos>"], lower_case=False, min_freq=2)
    blocks = []
    v.count_file(path, sink=blocks.append)
    v.build_vocab()
    with pytest.raises(UserError, match=r"train\.txt: line 2: 'b' is not in the vocabulary"):
        list(v.finish_provisional(blocks, path))


# ---- bad files -----------------------------------------------------------------------------------------------
def test_undecodable_bytes_are_located(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"fine line\nsecond \xe9t\xe9 line\n")
    with pytest.raises(UserError, match=r"bad\.txt: line 2, byte offset 17: invalid UTF-8 byte\(s\) e9;"):
        Vocab().build([path])


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(UserError, match=r"nope\.txt: file not found"):
        Vocab().build([tmp_path / "nope.txt"])
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(UserError, match=r"empty\.txt: file is empty"):
        Vocab().build([tmp_path / "empty.txt"])


# ---- vocabulary file (lm1b) ----------------------------------------------------------------------------------
def test_vocab_file_takes_first_fields_and_needs_unk(tmp_path):
    vf = write(tmp_path / "vocab.txt", "<S> 0\n</S> 0\n<UNK> 0\nthe 100\n\ncat 5\n")
    v = Vocab(lower_case=False, vocab_file=vf)
    v.build_vocab()
    assert v.idx2sym == ["<S>", "</S>", "<UNK>", "the", "cat"]
    assert v.get_idx("dog") == 2
    bad = write(tmp_path / "bad.txt", "the\ncat\n")
    with pytest.raises(UserError, match=r"bad\.txt: vocabulary file has no <UNK>"):
        Vocab(vocab_file=bad).build_vocab()


# ---- plain-type forms ------------------------------------------------------------------------------------------
def test_to_dict_from_dict_round_trip(tmp_path):
    path = write(tmp_path / "t.txt", "b a b c\n")
    v = Vocab(special=["<eos>"], lower_case=False).build([path])
    d = json.loads(json.dumps(v.to_dict()))
    w = Vocab.from_dict(d)
    assert w.idx2sym == v.idx2sym and w.eos_idx == 0 and w.lower_case is False and len(w) == 4
    assert w.encode("b c", add_eos=True) == [1, 3, 0]
    assert w.convert_to_sent([1, 3, 0], exclude=[0]) == "b c"
    with pytest.raises(UserError, match="newer"):
        Vocab.from_dict({**d, "format": 99})


def test_from_reference_dict():
    d = {"idx2sym": ["<eos>", "the", "<unk>"], "sym2idx": {"<eos>": 0, "the": 1, "<unk>": 2}, "special": ["<eos>"],
         "lower_case": False, "delimiter": None, "counter": {"the": 5}, "min_freq": 0, "max_size": None,
         "vocab_file": None, "eos_idx": 0}
    v = Vocab.from_reference(d)
    assert v.encode("the dog", add_eos=True) == [1, 2, 0]  # unknown -> <unk>, as eval.py --manual patches it


def test_reference_checkpoint_vocab_counts(shared_dir):
    """Our counting on PTB train in 'wt103' mode gives the reference checkpoint's vocab and counter."""
    from utils.io.checkpoint import load_checkpoint

    ref_vocab = load_checkpoint(shared_dir / "fixtures/reference-checkpoint/ptb_tiny_attn0.pt")["vocab"]
    v = Vocab(special=["<eos>"], lower_case=False).build([shared_dir / "data/ptb/train.txt"])
    assert v.idx2sym == ref_vocab["idx2sym"]
    assert list(v.counter.items()) == list(ref_vocab["counter"].items())


# ---- BPE -----------------------------------------------------------------------------------------------------
def bpe_text(rng: random.Random) -> str:
    pieces = ["the", "cat", " ", "  ", "\n", "\n\n", " \n", "\n ", "1,234", "3.14", "don't", "—", "日本", "\t", "<|endoftext|>"]
    return "".join(rng.choice(pieces) for _ in range(3000))


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    path = tmp_path_factory.mktemp("bpe") / "train.txt"
    write(path, bpe_text(random.Random(1)))
    return BPEVocab.train([path], vocab_size=300, min_frequency=1)


def test_bpe_file_encoding_equals_whole_text_encoding(tmp_path, bpe, small_chunks, monkeypatch):
    monkeypatch.setattr(vocabulary, "_BPE_PIECE_CHARS", 5)
    for seed in range(3):
        text = bpe_text(random.Random(seed + 10))
        path = write(tmp_path / "t.txt", text)
        want = bpe.tokenizer.encode(text).ids + [bpe.eot_idx]
        assert bpe.encode_file(path).tolist() == want


def test_bpe_surface_and_round_trip(tmp_path, bpe):
    assert len(bpe) % 8 == 0 and len(bpe) >= bpe.n_real
    ids = bpe.encode("the cat sat", add_eos=True)
    assert ids[-1] == bpe.eot_idx and bpe.convert_to_sent(ids[:-1]) == "the cat sat"
    assert bpe.get_indices(bpe.tokenize("the cat")) == bpe.encode("the cat")
    assert bpe.get_sym(len(bpe) - 1).startswith("madeupword") or len(bpe) == bpe.n_real
    again = Vocab.from_dict(json.loads(json.dumps(bpe.to_dict())))
    assert isinstance(again, BPEVocab) and again.encode("the cat sat") == ids[:-1] and len(again) == len(bpe)


def test_bpe_loads_gpt2_style_vocab_and_merges(tmp_path, bpe):
    folder = tmp_path / "gpt2"
    folder.mkdir()
    bpe.tokenizer.model.save(str(folder))  # writes vocab.json and merges.txt
    loaded = BPEVocab.load(folder)
    assert loaded.encode("the cat 3.14") == bpe.encode("the cat 3.14")
    with pytest.raises(UserError, match=r"merges\.txt: BPE file not found"):
        (folder / "merges.txt").unlink()
        BPEVocab.load(folder)
