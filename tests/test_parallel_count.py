"""utils/data/parallel.py: the parallel word counting of the cache build gives exactly Vocab.count_file's
provisional ids, counts and line ends (the serial code path is the truth), for any piece size and workers."""
import numpy as np
import pytest

from utils.data.parallel import count_file_parallel
from utils.data.vocabulary import Vocab


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    rng = np.random.default_rng(0)
    words = [f"W{i}" if i % 3 else f"w{i}" for i in range(800)] + ["ΣΑΣ", "x\u00a0y", "<unk>"]
    p = 1.0 / np.arange(1, len(words) + 1)
    lines = []
    for _ in range(3000):
        n = int(rng.integers(0, 25))
        lines.append("  ".join(rng.choice(words, n, p=p / p.sum())) if n else rng.choice(["", "   "]))
    lines.append(" ".join(["long"] * 30000))  # one line longer than a piece
    path = tmp_path_factory.mktemp("count") / "train.txt"
    path.write_text("\r\n".join(lines[:1500]) + "\n" + "\n".join(lines[1500:]), encoding="utf-8")  # no final newline
    return path


@pytest.mark.parametrize("lower_case", [False, True])
@pytest.mark.parametrize("workers,piece_chars", [(1, 500), (2, 3000), (2, 1 << 20)])
def test_parallel_counting_equals_the_serial_count(text_file, lower_case, workers, piece_chars):
    serial, blocks = Vocab(special=["<eos>"], lower_case=lower_case), []
    serial.count_file(text_file, sink=blocks.append)
    parallel, pieces = Vocab(special=["<eos>"], lower_case=lower_case), []
    count_file_parallel(parallel, text_file, pieces.append, workers=workers, piece_chars=piece_chars,
                        min_parallel_bytes=0)
    assert list(parallel._prov) == list(serial._prov)
    assert np.array_equal(parallel._counts, serial._counts)
    assert np.array_equal(np.concatenate(pieces), np.concatenate(blocks))
    serial.build_vocab()
    parallel.build_vocab()
    assert parallel.idx2sym == serial.idx2sym
