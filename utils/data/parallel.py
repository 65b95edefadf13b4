"""The word-level counting of the WikiText/PTB cache build over worker processes, on the engine of
scripts/prepare_corpus.py (utils.data.prepare.ordered_map: work units in order over a pool).

`count_file_parallel(vocab, path, sink)` is `Vocab.count_file(path, sink=sink)` for whitespace-separated
words (delimiter None) with the work split over processes: the main process reads the file in blocks
(iter_text_chunks) and cuts them at line ends into pieces of about `piece_chars`; a worker splits a piece
(lower-casing it first when the vocabulary does) and numbers its distinct words in first-seen order; the
main process then gives each piece's new words the next provisional ids, piece after piece, so the ids,
the counts and the blocks handed to `sink` are exactly those of Vocab.count_file (the same first-seen order,
the same line ends), and the cache's ids stay the reference's.
"""
import itertools
import os
from typing import Callable, Iterator

import numpy as np

from utils.data.prepare import ordered_map
from utils.data.vocabulary import Vocab, _pick_marker, iter_text_chunks

PIECE_CHARS = 1 << 20  # at most; smaller for small files, so that every worker gets several pieces
MIN_PARALLEL_BYTES = 1 << 20  # smaller files are counted in this process (starting workers costs more)


def _pieces(path, piece_chars: int, progress: bool) -> Iterator[str]:
    """The file's text in pieces of about piece_chars, each cut after a line end (or where the block ends)."""
    for text, _ in iter_text_chunks(path, split_long_lines=True, progress=progress, desc=f"counting {os.path.basename(path)}"):
        start = 0
        while start < len(text):
            end = text.find("\n", start + piece_chars) + 1 if start + piece_chars < len(text) else len(text)
            end = end or len(text)
            yield text[start:end]
            start = end


def _number_words(job: tuple[str, bool]) -> tuple[list[str], np.ndarray, int]:
    """(distinct words in first-seen order, each word's index in that list, index of the line-end marker or -1)."""
    text, lower_case = job
    if lower_case:
        text = text.lower()
    marker = _pick_marker(text)
    tokens = text.replace("\n", f" {marker} ").split()  # one split of the piece = per-line strip().split()
    table = dict(zip(dict.fromkeys(tokens), itertools.count()))
    local = np.fromiter(map(table.__getitem__, tokens), np.int32, len(tokens))
    return list(table), local, table.get(marker, -1)


def count_file_parallel(vocab: Vocab, path, sink: Callable[[np.ndarray], None], workers: int | None = None,
                        progress: bool = False, piece_chars: int | None = None,
                        min_parallel_bytes: int = MIN_PARALLEL_BYTES) -> None:
    """Vocab.count_file(path, sink=sink) for word vocabularies (delimiter None), over `workers` processes."""
    assert vocab.delimiter is None, "parallel counting splits on whitespace"
    workers = workers or os.cpu_count() or 1
    size = os.path.getsize(path)
    if size < min_parallel_bytes:
        workers = 1
    piece_chars = piece_chars or int(min(PIECE_CHARS, max(1 << 16, size // (4 * workers))))
    jobs = ((piece, vocab.lower_case) for piece in _pieces(path, piece_chars, progress))
    prov = vocab._prov
    for words, local, marker_index in ordered_map(_number_words, jobs, workers):
        if marker_index >= 0:
            marker = words[marker_index]
            glob = vocab._map(prov, words, marker)  # new words get the next provisional ids, in order
        else:
            glob = np.fromiter(map(prov.__getitem__, words), np.int64, len(words))
        ids = glob[local]
        vocab._add_counts(ids[ids >= 0])
        sink(ids)
