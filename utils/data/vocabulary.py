"""Vocabularies: word and character level (`Vocab`) and byte-level BPE (`BPEVocab`), stored as JSON.

`Vocab` gives the same ids as the reference trainer's vocabulary on the same files
(reference-inventory.md §5.1): lines are stripped, optionally lower-cased and split on whitespace (or on
`delimiter`; `''` means characters); the special symbols come first, then the counted symbols by
decreasing frequency, ties in the order they were first seen; `min_freq` / `max_size` cut that list;
`vocab_file` takes the symbols from the first field of each line of a file instead.

It is fast: files are read in large blocks of whole lines, split with `str.split` on the whole block, the
distinct symbols get provisional ids in first-seen order, counting is a `numpy.bincount`, and mapping a
block of symbols to ids is one C-level pass (`map(dict.__getitem__, ...)`). Line ends travel through the
pipeline as a sentinel id (`LINE_END`) so that `<eos>` / `<S>` handling and error line numbers stay exact.

Unknown symbols map to `<unk>` (or `<UNK>`) when the vocabulary has one; otherwise they are a `UserError`
naming the symbol (and the file and line when a file is encoded).

`BPEVocab` wraps a `tokenizers` byte-level BPE: trained offline on a training file, or loaded from a local
GPT-2 style `vocab.json` + `merges.txt` pair or a `tokenizer.json`; nothing is downloaded.

`fingerprint()` is a SHA-256 of what fixes the ids (the ordered symbols; for BPE also the merges and the
padded length): stored in checkpoints and the data cache, so a vocabulary swapped for another one of the same
size is noticed instead of scoring or training on misread ids.

`to_dict()` gives plain JSON-able types (used in checkpoints and the data cache); `Vocab.from_dict(d)`
rebuilds either kind; `Vocab.from_reference(d)` reads the plain dict of a reference checkpoint's vocab.
"""
import codecs
import collections
import hashlib
import itertools
import json
import os
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from utils.data.fast_words import KeyTable, WordBlock, scan_words, settle_allocator
from utils.io.errors import UserError

VOCAB_FORMAT = 1
EOS = "<eos>"
LINE_END = -2  # sentinel id marking the end of a line inside id blocks (never a real id)
_MISSING = -1  # sentinel id of a symbol that is not in the table
_CHUNK_CHARS = 1 << 23  # characters read per block (~8 MB of text)
_BPE_PIECE_CHARS = 1 << 16  # BPE encodes pieces of about this size in parallel
_PROGRESS_MIN_BYTES = 64 << 20  # files at least this big get a progress bar when progress is asked for
# Characters used to mark line ends inside a block before `str.split`; the first one absent from the block
# is used, so a marker can never collide with text. None of them is whitespace.
_MARKERS = "\x00\x01\x02\x03\x04\x05\x06\x07\x08\x0e\x0f\x10\x11\x12\x13\x14\x15\x16\x17\x18\x19\x1a" + "".join(
    chr(c) for c in range(0xE000, 0xE100)
)


# --------------------------------------------------------------------------------------------------------
# Reading text files
# --------------------------------------------------------------------------------------------------------
def check_text_file(path: str | os.PathLike, what: str = "file") -> Path:
    """The path of an existing, non-empty regular file, or a UserError naming it."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: {what} not found")
    if not path.is_file():
        raise UserError(f"{path}: {what} is not a regular file")
    if path.stat().st_size == 0:
        raise UserError(f"{path}: {what} is empty")
    return path


def _decode_error_message(path: Path) -> str:
    """Locate the first invalid UTF-8 sequence of `path`: byte offset, line and the bytes themselves."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    newlines = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            pending = decoder.getstate()[0]
            try:
                decoder.decode(block)
            except UnicodeDecodeError as exc:
                data = pending + block
                start = offset - len(pending) + exc.start
                newlines += data[: exc.start].count(b"\n")
                bad = data[exc.start : max(exc.end, exc.start + 1)][:8].hex(" ")
                return (
                    f"{path}: line {newlines + 1}, byte offset {start}: invalid UTF-8 byte(s) {bad}; convert the "
                    "file to UTF-8 (for example with iconv)"
                )
            newlines += block.count(b"\n") - pending.count(b"\n")
            offset += len(block)
    return f"{path}: the file is not valid UTF-8; convert it to UTF-8 (for example with iconv)"


def iter_text_chunks(
    path: str | os.PathLike,
    split_long_lines: bool = True,
    progress: bool = False,
    desc: str | None = None,
    add_final_newline: bool = True,
) -> Iterator[tuple[str, int]]:
    """Yield `(text, first_line_number)` blocks of a UTF-8 file, read as the reference reads it.

    Newlines are universal (`\\r\\n` and `\\r` become `\\n`, as in Python's text mode). Each block ends with
    a `\\n` so that it holds whole lines (a missing final newline is added unless `add_final_newline` is
    false), except that with `split_long_lines` a line longer than a block may be cut at a space (the next
    block continues it).
    Raises UserError when the file is missing, empty or not valid UTF-8.
    """
    path = check_text_file(path)
    size = path.stat().st_size
    bar = None
    if progress and size >= _PROGRESS_MIN_BYTES:
        from tqdm import tqdm

        bar = tqdm(total=size, unit="B", unit_scale=True, desc=desc or f"reading {path.name}", leave=False)
    line = 1
    last = ""  # the block yielded last: its lines are counted (a pass over it) only once another block is read
    pending: list[str] = []
    pending_len = 0
    open_line = False
    try:
        with open(path, encoding="utf-8") as f:
            done = 0
            while block := f.read(_CHUNK_CHARS):
                if last:  # (a block follows it: the next yield starts on a later line)
                    line += last.count("\n")
                    last = ""
                if bar is not None:
                    now = f.buffer.tell()
                    bar.update(now - done)
                    done = now
                cut = block.rfind("\n") + 1
                if cut == 0 and split_long_lines and pending_len + len(block) >= 4 * _CHUNK_CHARS:
                    cut = block.rfind(" ") + 1
                if cut == 0:
                    pending.append(block)
                    pending_len += len(block)
                    continue
                text = "".join(pending) + block[:cut] if pending else block[:cut]
                pending = [block[cut:]] if cut < len(block) else []
                pending_len = len(block) - cut
                yield text, line
                last = text
                open_line = not text.endswith("\n")
    except UnicodeDecodeError:
        raise UserError(_decode_error_message(path)) from None
    finally:
        if bar is not None:
            bar.close()
    tail = "".join(pending)
    if tail or open_line:  # the last line had no newline (or was cut at a space and ends here)
        line += last.count("\n")
        yield (tail + "\n" if add_final_newline else tail), line


def _pick_marker(text: str) -> str:
    for marker in _MARKERS:
        if marker not in text:
            return marker
    raise RuntimeError("no free line-end marker character")  # needs 278 distinct control/private chars


def finish_line_ends(
    ids: np.ndarray, add_eos: bool, add_double_eos: bool, eos_idx: int | None, s_idx: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """Replace the LINE_END sentinels of an id block as the reference's tokenize flags say.

    add_double_eos: each line becomes `<S> symbols <S>`; add_eos: `symbols <eos>`; neither: `symbols`.
    Returns (ids, starts): starts are the offsets where each line (sentence) begins in the result.
    """
    ends = np.flatnonzero(ids == LINE_END)
    line_starts = np.concatenate(([0], ends[:-1] + 1)) if len(ends) else np.zeros(0, np.int64)
    if add_double_eos:
        out = np.insert(ids, line_starts, s_idx)
        out[out == LINE_END] = s_idx
        return out, line_starts + np.arange(len(line_starts))
    if add_eos:
        out = ids.copy()
        out[ends] = eos_idx
        return out, line_starts
    return ids[ids != LINE_END], line_starts - np.arange(len(line_starts))


# --------------------------------------------------------------------------------------------------------
# Word / character vocabulary
# --------------------------------------------------------------------------------------------------------
class _FirstSeenIds(dict):
    """symbol -> provisional id; looking up a new symbol gives it the next id (first-seen order)."""

    def __init__(self):
        super().__init__()
        self.n = 0
        self.known = KeyTable()  # the numpy path's symbols by key: a later block's need not become strings

    def __missing__(self, sym: str) -> int:
        self[sym] = idx = self.n
        self.n += 1
        return idx

    def ids_of_distinct(self, symbols: list[str]) -> np.ndarray:
        """The ids of `symbols` (distinct, in first-seen order): the new ones numbered in that order, added in
        one C-level update instead of one __missing__ call each."""
        ids = np.fromiter(map(self.get, symbols, itertools.repeat(_MISSING)), np.int64, len(symbols))
        new = np.flatnonzero(ids == _MISSING)
        if len(new):
            ids[new] = np.arange(self.n, self.n + len(new))
            self.update(zip(map(symbols.__getitem__, new.tolist()), range(self.n, self.n + len(new))))
            self.n += len(new)
        return ids

    def ids_of_block(self, block: WordBlock) -> np.ndarray:
        """ids_of_distinct(block.symbols), where only the symbols not found by key in `known` are decoded and
        looked up by their string (found ones are the same bytes, so the same string)."""
        ids, found = self.known.find(block)
        missing = np.flatnonzero(~found)
        if len(missing):
            ids[missing] = self.ids_of_distinct(block.decode(missing))
            self.known.add(block, missing, ids[missing])
        return ids


class Vocab:
    """Word (or character, `delimiter=''`) vocabulary with the reference's ids; see the module docstring."""

    def __init__(
        self,
        special: Sequence[str] = (),
        min_freq: int = 0,
        max_size: int | None = None,
        lower_case: bool = True,
        delimiter: str | None = None,
        vocab_file: str | os.PathLike | None = None,
    ):
        self.special = list(special)
        self.min_freq = min_freq
        self.max_size = max_size
        self.lower_case = lower_case
        self.delimiter = delimiter
        self.vocab_file = str(vocab_file) if vocab_file is not None else None
        self.idx2sym: list[str] = []
        self.sym2idx: dict[str, int] = {}
        self.eos_idx: int | None = None
        self.unk_idx: int | None = None
        # Counting state: provisional ids in first-seen order and their counts.
        self._prov = _FirstSeenIds()
        self._counts = np.zeros(0, np.int64)
        self._remap: np.ndarray | None = None  # remap_provisional's result, once the vocabulary is built

    # ---- tokenizing --------------------------------------------------------------------------------------
    def tokenize(self, line: str, add_eos: bool = False, add_double_eos: bool = False) -> list[str]:
        line = line.strip()
        if self.lower_case:
            line = line.lower()
        symbols = list(line) if self.delimiter == "" else line.split(self.delimiter)
        if add_double_eos:  # lm1b
            return ["<S>"] + symbols + ["<S>"]
        if add_eos:
            return symbols + [EOS]
        return symbols

    def _id_blocks(
        self, path: str | os.PathLike, table: dict[str, int], progress: bool = False, desc: str = "reading",
        count: bool = False,
    ) -> Iterator[tuple[np.ndarray, Callable[[int], str], int, tuple | None]]:
        """Yield (ids, word_of, first_line, counted) per block of `path`, lower-cased when asked: the ids of
        the block's symbols in `table` (see `_map`) with LINE_END after each line, `word_of(pos)` the symbol
        at position `pos` of the ids (for error messages), and with `count` on the numpy path
        `counted = (ids of the block's distinct symbols, their counts)` (else None: count `ids` yourself).

        Word-level blocks are tokenized and grouped in numpy (utils/data/fast_words.py); only the block's
        distinct symbols are then looked up in `table`, in first-seen order, so a _FirstSeenIds table numbers
        them as a per-token pass would. Other blocks take the Python path (one split of the whole block).
        """
        chunks = iter_text_chunks(
            path, split_long_lines=self.delimiter is None, progress=progress, desc=f"{desc} {Path(path).name}"
        )
        if self.delimiter is None:
            settle_allocator()
        for text, first_line in chunks:
            if self.lower_case:
                text = text.lower()
            block = scan_words(text) if self.delimiter is None else None
            if block is not None:
                if isinstance(table, _FirstSeenIds):
                    distinct = table.ids_of_block(block)
                else:
                    distinct = self._map(table, block.symbols, "\n")  # no symbol holds a newline
                counted = (distinct, block.counts()) if count else None
                word_of = lambda pos, block=block: block.symbols[block.ids(np.arange(len(block.symbols)))[pos]]
                yield block.ids(distinct, LINE_END), word_of, first_line, counted
                continue
            marker = _pick_marker(text)
            if self.delimiter is None:  # one split of the whole block equals per-line strip().split()
                tokens = text.replace("\n", f" {marker} ").split()
            else:
                tokens = []
                for line in text.split("\n")[:-1]:
                    line = line.strip()
                    tokens.extend(list(line) if self.delimiter == "" else line.split(self.delimiter))
                    tokens.append(marker)
            yield self._map(table, tokens, marker), tokens.__getitem__, first_line, None

    def _add_counts(self, ids: np.ndarray, counts: np.ndarray | None = None) -> None:
        total = np.bincount(ids, weights=counts, minlength=self._prov.n).astype(np.int64)
        total[: len(self._counts)] += self._counts
        self._counts = total

    def _add_distinct_counts(self, ids: np.ndarray, counts: np.ndarray) -> None:
        """Add `counts` to the provisional ids `ids` (distinct, so one fancy += adds each once)."""
        if len(self._counts) < self._prov.n:
            self._counts = np.concatenate((self._counts, np.zeros(self._prov.n - len(self._counts), np.int64)))
        self._counts[ids] += counts

    @staticmethod
    def _map(table: dict[str, int], tokens: list[str], marker: str) -> np.ndarray:
        """Ids of `tokens` in `table`; the marker becomes LINE_END and unknown symbols _MISSING (or, when
        `table` is a _FirstSeenIds, new provisional ids)."""
        table[marker] = LINE_END
        try:
            try:
                return np.fromiter(map(table.__getitem__, tokens), np.int64, len(tokens))
            except KeyError:
                return np.fromiter(map(table.get, tokens, itertools.repeat(_MISSING)), np.int64, len(tokens))
        finally:
            del table[marker]

    # ---- counting and building ---------------------------------------------------------------------------
    def count_file(
        self,
        path: str | os.PathLike,
        verbose: bool = False,
        sink: Callable[[np.ndarray], None] | None = None,
        progress: bool = False,
    ) -> None:
        """Count the symbols of a file (no `<eos>`, as the reference's count_file).

        `sink`, when given, receives every block of provisional ids (LINE_END at line ends); after
        `build_vocab()`, `finish_provisional` turns them into final ids without reading the file again.
        """
        if verbose:
            print(f"counting file {path} ...", flush=True)
        for ids, _, _, counted in self._id_blocks(path, self._prov, progress=progress, desc="counting", count=True):
            if counted is None:
                self._add_counts(ids[ids >= 0])
            else:
                self._add_distinct_counts(*counted)
            if sink is not None:
                sink(ids)

    def drop_counts(self) -> None:
        """Forget the counting state (provisional ids and counts): what is left is the vocabulary as its JSON
        (`to_dict`) holds it."""
        self._prov = _FirstSeenIds()
        self._counts = np.zeros(0, np.int64)
        self._remap = None

    @property
    def counter(self) -> collections.Counter:
        """The counts as a Counter in first-seen order (what the reference's `vocab.counter` holds)."""
        return collections.Counter(dict(zip(self._prov, self._counts.tolist())))

    def build_vocab(self, verbose: bool = False) -> None:
        if self.vocab_file:
            if verbose:
                print(f"building vocab from {self.vocab_file}", flush=True)
            self._build_from_file(self.vocab_file)
            if verbose:
                print(f"final vocab size {len(self)}", flush=True)
            return
        if verbose:
            print(f"building vocab with min_freq={self.min_freq}, max_size={self.max_size}", flush=True)
        syms = list(self._prov)
        counts = self._counts[: len(syms)]
        order = np.argsort(-counts, kind="stable")  # most_common: by count, ties in first-seen order
        if self.max_size is not None:
            order = order[: self.max_size]
        if self.min_freq:
            below = np.flatnonzero(counts[order] < self.min_freq)
            if len(below):
                order = order[: below[0]]
        idx2sym = list(dict.fromkeys(self.special))
        special_ids = [i for i in map(self._prov.get, idx2sym) if i is not None]  # counted specials keep their place
        if special_ids:
            order = order[~np.isin(order, special_ids)]
        idx2sym += map(syms.__getitem__, order.tolist())
        self._set_symbols(idx2sym)
        if verbose:
            print(f"final vocab size {len(self)} from {len(syms)} unique tokens", flush=True)

    def build(self, paths: Iterable[str | os.PathLike], verbose: bool = False) -> "Vocab":
        """Count `paths` (unless the vocabulary comes from `vocab_file`) and build; returns self."""
        if not self.vocab_file:
            for path in paths:
                self.count_file(path, verbose=verbose)
        self.build_vocab(verbose=verbose)
        return self

    def _build_from_file(self, vocab_file: str) -> None:
        path = check_text_file(vocab_file, "vocabulary file")
        symbols = []
        for text, _ in iter_text_chunks(path, split_long_lines=False):
            symbols += [fields[0] for fields in (line.split() for line in text.split("\n")) if fields]
        self._set_symbols(list(dict.fromkeys(symbols)))
        if self.unk_idx is None:
            raise UserError(f"{path}: vocabulary file has no <UNK> (or <unk>) symbol for unknown words")

    def _set_symbols(self, idx2sym: list[str]) -> None:
        self._remap = None
        self.idx2sym = idx2sym
        self.sym2idx = dict(zip(idx2sym, range(len(idx2sym))))
        self.eos_idx = self.sym2idx.get(EOS)
        self.unk_idx = self.sym2idx.get("<unk>", self.sym2idx.get("<UNK>"))

    # ---- encoding files ----------------------------------------------------------------------------------
    def _line_ends_ids(self, path: str | os.PathLike, add_eos: bool, add_double_eos: bool) -> tuple:
        eos_idx = s_idx = None
        if add_double_eos:
            s_idx = self.sym2idx.get("<S>")
            if s_idx is None:
                raise UserError(f"{path}: sentences need <S>, which the vocabulary does not have")
        elif add_eos:
            eos_idx = self.sym2idx.get(EOS)
            if eos_idx is None:
                raise UserError(f"{path}: lines end with {EOS}, which the vocabulary does not have")
        return eos_idx, s_idx

    def _fill_unknown(self, ids: np.ndarray, path, first_line: int, word_of: Callable[[int], str]) -> None:
        """Map _MISSING ids to <unk>, or raise UserError naming the first unknown word, file and line."""
        missing = np.flatnonzero(ids == _MISSING)
        if not len(missing):
            return
        if self.unk_idx is not None:
            ids[missing] = self.unk_idx
            return
        pos = int(missing[0])
        line = first_line + int(np.count_nonzero(ids[:pos] == LINE_END))
        raise UserError(
            f"{path}: line {line}: {word_of(pos)!r} is not in the vocabulary, which has no <unk> to stand for "
            "unknown words; build the vocabulary from this file too or add <unk> to the data"
        )

    def encode_chunks(
        self, path: str | os.PathLike, add_eos: bool = True, add_double_eos: bool = False, progress: bool = False
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Encode a file block by block: yields (ids int64, line starts within the block)."""
        eos_idx, s_idx = self._line_ends_ids(path, add_eos, add_double_eos)
        table = dict(self.sym2idx)
        for ids, word_of, first_line, _ in self._id_blocks(path, table, progress=progress, desc="encoding"):
            self._fill_unknown(ids, path, first_line, word_of)
            yield finish_line_ends(ids, add_eos, add_double_eos, eos_idx, s_idx)

    def encode_file(
        self,
        path: str | os.PathLike,
        ordered: bool = True,
        add_eos: bool = True,
        add_double_eos: bool = False,
        verbose: bool = False,
        progress: bool = False,
    ) -> np.ndarray | list[np.ndarray]:
        """All ids of a file: one int64 array (ordered) or one array per line (not ordered)."""
        if verbose:
            print(f"encoding file {path} ...", flush=True)
        blocks, sents = [], []
        for ids, starts in self.encode_chunks(path, add_eos, add_double_eos, progress):
            if ordered:
                blocks.append(ids)
            else:
                sents += np.split(ids, starts[1:]) if len(starts) else []
        if ordered:
            return np.concatenate(blocks) if blocks else np.zeros(0, np.int64)
        return sents

    def remap_provisional(self) -> np.ndarray:
        """Array mapping provisional ids (from counting) to final ids; _MISSING where a symbol was dropped.
        Computed once per vocabulary (each split's finish_provisional asks for it); do not modify it."""
        if self._remap is None or len(self._remap) != len(self._counts):
            remap = np.full(len(self._counts), _MISSING, np.int64)
            prov = np.fromiter(map(self._prov.get, self.idx2sym, itertools.repeat(_MISSING)), np.int64, len(self))
            known = prov >= 0
            remap[prov[known]] = np.flatnonzero(known)
            self._remap = remap
        return self._remap

    def finish_provisional(
        self,
        blocks: Iterable[np.ndarray],
        path: str | os.PathLike,
        add_eos: bool = True,
        add_double_eos: bool = False,
        starts: bool = True,
        dtype=np.int64,
    ) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        """Turn the provisional id blocks that count_file gave its sink into final (ids, line starts).

        `starts=False`: the line starts are not wanted (None is yielded instead); then, where lines end with
        <eos> and every provisional id has a final one (or <unk> stands for those that have not), each block
        is a single gather from a table that maps line ends to <eos> too, into `dtype` (which must hold every
        id; other cases give int64)."""
        eos_idx, s_idx = self._line_ends_ids(path, add_eos, add_double_eos)
        # one gather per block: the provisional LINE_END (-2) indexes lookup[-2], which keeps it
        lookup = np.concatenate((self.remap_provisional(), [LINE_END, _MISSING]))
        if not starts and add_eos and not add_double_eos and (self.unk_idx is not None or (lookup[:-2] >= 0).all()):
            table = lookup.copy()
            table[table == _MISSING] = self.unk_idx if self.unk_idx is not None else 0  # (only table[-1]: unused)
            table[-2] = eos_idx
            table = table.astype(dtype)
            for prov in blocks:
                yield table[prov], None
            return
        line = 1
        for prov in blocks:
            prov = np.asarray(prov)
            ids = lookup[prov]
            self._fill_unknown(ids, path, line, lambda pos: list(self._prov)[prov[pos]])
            ids, starts = finish_line_ends(ids, add_eos, add_double_eos, eos_idx, s_idx)
            line += len(starts)  # one start per line end
            yield ids, starts

    # ---- symbols and ids ---------------------------------------------------------------------------------
    def get_idx(self, sym: str) -> int:
        idx = self.sym2idx.get(sym)
        if idx is not None:
            return idx
        if self.unk_idx is not None:
            return self.unk_idx
        raise UserError(f"{sym!r} is not in the vocabulary, which has no <unk> to stand for unknown words")

    def get_sym(self, idx: int) -> str:
        if not 0 <= idx < len(self.idx2sym):
            raise IndexError(f"index {idx} out of range for a vocabulary of {len(self.idx2sym)} symbols")
        return self.idx2sym[idx]

    def get_indices(self, symbols: Iterable[str]) -> list[int]:
        return [self.get_idx(sym) for sym in symbols]

    def get_symbols(self, indices: Iterable[int]) -> list[str]:
        return [self.get_sym(int(idx)) for idx in indices]

    def encode(self, text: str | Sequence[str], add_eos: bool = False, add_double_eos: bool = False) -> list[int]:
        """Ids of one line of text (tokenized as the vocabulary does) or of a list of symbols."""
        symbols = self.tokenize(text, add_eos, add_double_eos) if isinstance(text, str) else text
        return self.get_indices(symbols)

    def convert_to_tensor(self, symbols: Iterable[str]) -> torch.Tensor:
        return torch.tensor(self.get_indices(symbols), dtype=torch.long)

    def convert_to_sent(self, indices: Iterable[int], exclude: Iterable[int] | None = None) -> str:
        exclude = set(exclude or ())
        joiner = "" if self.delimiter == "" else " "
        return joiner.join(self.get_sym(int(idx)) for idx in indices if int(idx) not in exclude)

    def decode(self, indices: Iterable[int]) -> str:
        return self.convert_to_sent(indices)

    def __len__(self) -> int:
        return len(self.idx2sym)

    def fingerprint(self) -> str:
        """SHA-256 (hex) of the ordered symbol list: equal exactly when every id means the same symbol."""
        return _digest({"type": "word", "idx2sym": self.idx2sym})

    # ---- plain-type form ---------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "type": "word",
            "format": VOCAB_FORMAT,
            "idx2sym": list(self.idx2sym),
            "special": list(self.special),
            "lower_case": self.lower_case,
            "delimiter": self.delimiter,
            "min_freq": self.min_freq,
            "max_size": self.max_size,
            "vocab_file": self.vocab_file,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Vocab | BPEVocab":
        """Rebuild a vocabulary from `to_dict()` output (word or BPE)."""
        if not isinstance(d, dict) or "type" not in d:
            raise UserError("not a vocabulary (a dict with 'type' is expected)")
        if d["type"] == "bpe":
            return BPEVocab.from_dict(d)
        if d["type"] != "word":
            raise UserError(f"unknown vocabulary type {d['type']!r}")
        if d.get("format", VOCAB_FORMAT) > VOCAB_FORMAT:
            raise UserError(f"vocabulary format {d['format']} is newer than this version reads ({VOCAB_FORMAT})")
        return cls._from_fields(d)

    @classmethod
    def from_reference(cls, d: dict) -> "Vocab":
        """A vocabulary from the plain dict of a reference checkpoint's Vocab (idx2sym, special, ...)."""
        if not isinstance(d, dict) or not isinstance(d.get("idx2sym"), list):
            raise UserError("the reference vocabulary has no idx2sym list")
        return cls._from_fields(d)

    @classmethod
    def _from_fields(cls, d: dict) -> "Vocab":
        vocab = cls(
            special=d.get("special") or (),
            min_freq=d.get("min_freq") or 0,
            max_size=d.get("max_size"),
            lower_case=bool(d.get("lower_case", True)),
            delimiter=d.get("delimiter"),
            vocab_file=d.get("vocab_file"),
        )
        vocab._set_symbols([str(sym) for sym in d["idx2sym"]])
        if len(vocab.sym2idx) != len(vocab.idx2sym):
            raise UserError("the vocabulary lists a symbol twice")
        return vocab


# --------------------------------------------------------------------------------------------------------
# Byte-level BPE
# --------------------------------------------------------------------------------------------------------
EOT = "<|endoftext|>"


def _safe_cuts(text: str, piece_chars: int, specials: Sequence[str] = ()) -> list[int]:
    """Offsets where `text` may be cut without changing its byte-level BPE encoding.

    The GPT-2 pre-tokenizer regex never lets a pre-token run across a space that is followed by a non-space
    character (the space starts the next pre-token, and everything before it ends where it would end at the
    end of the text), so encoding the pieces separately gives the same ids as encoding the whole text. A
    special token after the space is the exception (the text around it is pre-tokenized separately, and the
    space joins the whitespace before it), so such spaces are not used.
    The cuts are about `piece_chars` apart; the last offset returned is where the unfinished tail begins.
    """
    cuts = []
    start = 0
    end = len(text) - 1
    while start + piece_chars < end:
        pos = start + piece_chars
        while True:
            pos = text.find(" ", pos, end)
            if pos < 0:
                return cuts
            nxt = text[pos + 1]
            if not nxt.isspace() and not any(text.startswith(s, pos + 1) for s in specials if s[0] == nxt):
                break
            pos += 1
        cuts.append(pos)
        start = pos
    return cuts


def check_fingerprint(vocab, stored, where: str, remedy: str) -> None:
    """UserError when `stored` (the fingerprint written next to `vocab`, None for files written before there
    was one) is not `vocab`'s: the vocabulary was edited or swapped since, so the ids would be misread."""
    if stored is not None and stored != vocab.fingerprint():
        raise UserError(f"{where}: the vocabulary is not the one it was written with (fingerprint "
                        f"{str(stored)[:12]}, the vocabulary's is {vocab.fingerprint()[:12]}); {remedy}")


def _digest(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, ensure_ascii=False, sort_keys=True).encode("utf-8")).hexdigest()


class BPEVocab:
    """Byte-level BPE (GPT-2 style) over `tokenizers`, with the word vocabulary's surface.

    The length is padded to a multiple of `pad_to` (the reference padded GPT-2's 50,257 to 50,264); the
    padding ids decode to `madeupword{i:09d}` and never occur in encoded text. `encode_file` encodes the
    whole file and appends `<|endoftext|>`, as the reference's OpenAIVocab did.
    """

    def __init__(self, tokenizer, pad_to: int = 8):
        self.tokenizer = tokenizer
        self.pad_to = pad_to
        self.n_real = tokenizer.get_vocab_size(with_added_tokens=True)
        self.eot_idx = tokenizer.token_to_id(EOT)
        if self.eot_idx is None:
            raise UserError(f"the BPE tokenizer has no {EOT} token")
        self.eos_idx = self.eot_idx
        self.unk_idx = None
        self.added_tokens = [t.content for t in tokenizer.get_added_tokens_decoder().values()]
        self.special = [EOT]

    # ---- construction ------------------------------------------------------------------------------------
    @staticmethod
    def _byte_level(model):
        from tokenizers import Tokenizer, decoders, pre_tokenizers

        tokenizer = Tokenizer(model)
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        return tokenizer

    @classmethod
    def train(
        cls, paths: Sequence[str | os.PathLike], vocab_size: int = 32000, min_frequency: int = 2, progress=False
    ) -> "BPEVocab":
        """Train a byte-level BPE on text files (offline)."""
        from tokenizers import models, pre_tokenizers, trainers

        paths = [str(check_text_file(p)) for p in paths]
        tokenizer = cls._byte_level(models.BPE())
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=[EOT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=progress,
        )
        tokenizer.train(paths, trainer)
        return cls(tokenizer)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "BPEVocab":
        """A local `tokenizer.json`, or a folder with GPT-2's `vocab.json` and `merges.txt`."""
        from tokenizers import Tokenizer, models

        path = Path(path)
        try:
            if path.is_dir():
                vocab, merges = path / "vocab.json", path / "merges.txt"
                for p in (vocab, merges):
                    check_text_file(p, "BPE file")
                return cls(cls._byte_level(models.BPE.from_file(str(vocab), str(merges))))
            check_text_file(path, "BPE tokenizer file")
            return cls(Tokenizer.from_file(str(path)))
        except UserError:
            raise
        except Exception as exc:  # tokenizers raises plain Exceptions for malformed files
            raise UserError(f"{path}: not a BPE tokenizer ({str(exc).splitlines()[0][:200]})") from None

    # ---- encoding ----------------------------------------------------------------------------------------
    def tokenize(self, line: str, add_eos: bool = False, add_double_eos: bool = False) -> list[str]:
        tokens = self.tokenizer.encode(line).tokens
        return tokens + [EOT] if add_eos or add_double_eos else tokens

    def encode(self, text: str | Sequence[str], add_eos: bool = False, add_double_eos: bool = False) -> list[int]:
        if not isinstance(text, str):
            return self.get_indices(text)
        ids = self.tokenizer.encode(text).ids
        return ids + [self.eot_idx] if add_eos or add_double_eos else ids

    def encode_chunks(self, path: str | os.PathLike, progress: bool = False) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The whole file's ids then `<|endoftext|>`, block by block (pieces encoded in parallel)."""
        tail = ""
        chunks = iter_text_chunks(
            path, split_long_lines=False, progress=progress, desc=f"encoding {Path(path).name}", add_final_newline=False
        )
        for text, _ in chunks:
            text = tail + text
            bounds = [0] + _safe_cuts(text, _BPE_PIECE_CHARS, self.added_tokens)
            tail = text[bounds[-1] :]
            if len(bounds) > 1:
                pieces = [text[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
                yield self._encode_pieces(pieces), np.zeros(0, np.int64)
        ids = self._encode_pieces([tail]) if tail else np.zeros(0, np.int64)
        yield np.concatenate([ids, [self.eot_idx]]).astype(np.int64), np.zeros(0, np.int64)

    def _encode_pieces(self, pieces: list[str]) -> np.ndarray:
        encodings = self.tokenizer.encode_batch(pieces, add_special_tokens=False)
        return np.fromiter(itertools.chain.from_iterable(e.ids for e in encodings), np.int64)

    def encode_file(self, path: str | os.PathLike, verbose: bool = False, progress: bool = False) -> np.ndarray:
        """The whole file's ids then `<|endoftext|>` (no per-line ends, unlike Vocab.encode_file)."""
        if verbose:
            print(f"encoding file {path} ...", flush=True)
        return np.concatenate([ids for ids, _ in self.encode_chunks(path, progress=progress)])

    # ---- symbols and ids ---------------------------------------------------------------------------------
    def get_idx(self, sym: str) -> int:
        idx = self.tokenizer.token_to_id(sym)
        if idx is None:
            raise UserError(f"{sym!r} is not a token of the BPE vocabulary")
        return idx

    def get_sym(self, idx: int) -> str:
        if not 0 <= idx < len(self):
            raise IndexError(f"index {idx} out of range for a vocabulary of {len(self)} symbols")
        if idx >= self.n_real:
            return f"madeupword{idx - self.n_real:09d}"
        return self.tokenizer.id_to_token(idx)

    def get_indices(self, symbols: Iterable[str]) -> list[int]:
        return [self.get_idx(sym) for sym in symbols]

    def get_symbols(self, indices: Iterable[int]) -> list[str]:
        return [self.get_sym(int(idx)) for idx in indices]

    def convert_to_tensor(self, symbols: Iterable[str]) -> torch.Tensor:
        return torch.tensor(self.get_indices(symbols), dtype=torch.long)

    def convert_to_sent(self, indices: Iterable[int], exclude: Iterable[int] | None = None) -> str:
        exclude = set(exclude or ())
        ids = [int(i) for i in indices if int(i) not in exclude and int(i) < self.n_real]
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def decode(self, indices: Iterable[int]) -> str:
        return self.convert_to_sent(indices)

    def __len__(self) -> int:
        return -(-self.n_real // self.pad_to) * self.pad_to

    def fingerprint(self) -> str:
        """SHA-256 (hex) of the ordered tokens, the merges and the padded length: two BPE vocabularies of the
        same size can split text differently, so the symbols alone do not decide the ids."""
        model = json.loads(self.tokenizer.to_str()).get("model", {})
        tokens = [self.tokenizer.id_to_token(i) for i in range(self.n_real)]
        return _digest({"type": "bpe", "tokens": tokens, "merges": model.get("merges"), "length": len(self)})

    # ---- plain-type form ---------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"type": "bpe", "format": VOCAB_FORMAT, "tokenizer": self.tokenizer.to_str(), "pad_to": self.pad_to}

    @classmethod
    def from_dict(cls, d: dict) -> "BPEVocab":
        from tokenizers import Tokenizer

        if d.get("format", VOCAB_FORMAT) > VOCAB_FORMAT:
            raise UserError(f"vocabulary format {d['format']} is newer than this version reads ({VOCAB_FORMAT})")
        try:
            tokenizer = Tokenizer.from_str(d["tokenizer"])
        except Exception as exc:
            raise UserError(f"the stored BPE tokenizer cannot be read ({str(exc)[:200]})") from None
        return cls(tokenizer, pad_to=int(d.get("pad_to", 8)))
