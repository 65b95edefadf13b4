"""Prepare a large corpus (Wikipedia scale) for training: articles in, token-id shards out.

    python scripts/prepare_corpus.py INPUT... --output DIR [--max_vocab_size N] [--workers N] ...

Inputs (files, or folders read recursively in name order; `.gz`, `.bz2`, `.xz` are decompressed while they
are read): JSON Lines (one article per line, its text under `text_key`, an optional title under `title_key`
written as the article's first line), JSON arrays of such objects, the `<doc ...> ... </doc>` output of the
usual Wikipedia extractors, and plain text (`text_docs`: a whole file, each blank-line separated paragraph, or
each line is one article). Each non-empty line of an article becomes its tokens (words, or characters with
`level='char'`) followed by `<eos>`; the article ends with `<eod>` (`doc_separator`).

Two passes; the input is read once, streaming. It is cut into chunks of about `chunk_bytes` of whole
records, the same chunks whatever the number of workers, processed by `workers` processes in order
(`ordered_map`):

1. Tokenize and count with a bounded memory. A worker tokenizes a chunk once into `DIR/.work/chunks/`
   (chunk-local ids in first-seen order, and the chunk's symbol list; written atomically, so a killed run
   resumes with the chunks it finished) and returns the chunk's counts keyed by the symbols' hashes. The main
   process merges them, in chunk order, into a Misra-Gries summary of at most `2 * count_capacity` keys: when
   it is over, every count drops by the (capacity+1)-th largest count `t` and the keys at zero go. `D`, the sum
   of those drops, bounds the error: for every symbol the summary gives `lower <= f <= upper = c + D` (f: the
   true count; c = 0 for a symbol not in the summary; see BoundedCounter). The candidates are the symbols with
   `upper >= T`, T being the `max_vocab_size`-th largest lower bound (or `min_freq` when larger): a symbol
   outside has `f < T`, below `max_vocab_size` symbols whose f is at least T, so the true top `max_vocab_size`
   (and every symbol with f >= min_freq) are candidates whenever T > D, which the pass checks and records
   (`counting.exact` in the manifest). Their strings are found in the chunk files (`.work/pass1.json`).
2. Exact counts and first-seen positions of the candidates from the chunk files (numpy), the vocabulary (by
   count, ties in first-seen order, as utils.data.vocabulary.Vocab builds it), the split of the articles
   (`valid_docs`/`test_docs` or the fractions, drawn with `seed`), and the output: per split `.npy` shards of
   `shard_tokens` ids, `<split>.docs.npy` (the offset of each article in the split, then the total),
   `vocab.json` (Vocab.to_dict) and `manifest.json` (sizes, sha256 of every file, counts, `<unk>` fraction).

With `level='bpe'` a byte-level BPE is first trained on the first `bpe_sample_mb` MB of articles; the workers
write the final BPE ids and nothing is counted.

The output depends on the input and the options only, never on `workers` (same bytes).

Memory: the main process holds one chunk being read, at most `2 * workers` chunks in flight, the summary (at
most 2 * count_capacity keys of 24 bytes in numpy arrays: 48 MB for the default capacity of 1,000,000, and
as much again while a chunk is merged), then the candidate table (at most that many strings) and one shard
buffer (`shard_tokens` ids); each worker one chunk (about 100 MB for the default 4 MB). Temporary disk: about
the size of the input text. The summary's keys are utils.data.fast_words's 64-bit keys (a symbol of up to 7
bytes is its own key, a longer one's a hash of its bytes): a hash collision between two long symbols (about
1e-7 for 2 million distinct symbols) would merge their counts in the summary.
"""
import bz2
import collections
import dataclasses
import gzip
import hashlib
import io
import itertools
import json
import lzma
import multiprocessing
import operator
import os
import shutil
import sys
import time
import zlib
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from utils.data import fast_words
from utils.data.fast_words import WordBlock, scan_words, settle_allocator
from utils.io.atomic import atomic_open, fsync_dir, write_text_atomic
from utils.io.errors import UserError

FORMAT = "txl-prepared-corpus"
VERSION = 1
EOS = "<eos>"
UNK = "<unk>"
EOT = "<|endoftext|>"  # --level bpe: closes each article (utils.data.vocabulary.BPEVocab's end of text)
SPLITS = ("train", "valid", "test")
INPUT_FORMATS = ("auto", "jsonl", "json", "wikiextractor", "text")
TEXT_DOCS = ("file", "paragraph", "line")
_DECOMPRESS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
_READ_ERRORS = (OSError, EOFError, lzma.LZMAError, zlib.error)  # a damaged or truncated input


@dataclasses.dataclass(frozen=True)
class Options:
    """Everything that decides the output (plus `workers` and `progress`, which do not)."""

    text_key: str = "text"
    title_key: str | None = None
    input_format: str = "auto"
    text_docs: str = "file"
    doc_separator: str = "<eod>"
    level: str = "word"
    lower_case: bool = False
    moses: bool = False
    moses_lang: str = "en"
    max_vocab_size: int | None = None
    min_freq: int = 0
    count_capacity: int = 1_000_000
    valid_docs: int | None = None
    test_docs: int | None = None
    valid_fraction: float | None = None
    test_fraction: float | None = None
    seed: int = 0
    shard_tokens: int = 1 << 25
    skip_bad_lines: bool = False
    chunk_bytes: int = 4 << 20
    bpe_vocab_size: int = 32000
    bpe_sample_mb: float = 100.0

    def specials(self) -> list[str]:
        return [EOS, self.doc_separator, UNK]

    def counting_key(self) -> dict:
        """The options that passes 1 and 2 depend on (a resume needs the same); splits and shards do not."""
        keep = ("text_key", "title_key", "input_format", "text_docs", "doc_separator", "level", "lower_case", "moses",
                "moses_lang", "max_vocab_size", "min_freq", "count_capacity", "skip_bad_lines", "chunk_bytes",
                "bpe_vocab_size", "bpe_sample_mb")
        return {k: getattr(self, k) for k in keep}


def check_options(opts: Options) -> None:
    """One-line errors for options that cannot work, before anything is read or written."""
    if opts.input_format not in INPUT_FORMATS:
        raise UserError(f"--format must be one of {', '.join(INPUT_FORMATS)}, not {opts.input_format!r}")
    if opts.text_docs not in TEXT_DOCS:
        raise UserError(f"--text_docs must be one of {', '.join(TEXT_DOCS)}, not {opts.text_docs!r}")
    if opts.level not in ("word", "char", "bpe"):
        raise UserError(f"--level must be word, char or bpe, not {opts.level!r}")
    if opts.level == "bpe" and (opts.moses or opts.max_vocab_size or opts.min_freq):
        raise UserError("--level bpe sizes its vocabulary with --bpe_vocab_size and encodes the raw text; drop "
                        "--moses, --max_vocab_size and --min_freq")
    if opts.level == "bpe" and (opts.bpe_vocab_size < 300 or opts.bpe_sample_mb <= 0):
        raise UserError("--bpe_vocab_size must be at least 300 (256 bytes and the merges) and --bpe_sample_mb positive")
    if not opts.doc_separator or any(c.isspace() for c in opts.doc_separator) or opts.doc_separator in (EOS, UNK):
        raise UserError(f"--doc_separator {opts.doc_separator!r} must be a non-empty symbol without spaces, other "
                        f"than {EOS} and {UNK}")
    if opts.max_vocab_size is not None and opts.max_vocab_size < 1:
        raise UserError("--max_vocab_size must be at least 1")
    if opts.min_freq < 0 or opts.count_capacity < 1 or opts.shard_tokens < 1 or opts.chunk_bytes < 1:
        raise UserError("--min_freq must be >= 0, and --count_capacity, --shard_tokens and --chunk_mb positive")
    if opts.max_vocab_size is not None and opts.count_capacity < opts.max_vocab_size:
        raise UserError(f"--count_capacity ({opts.count_capacity}) must be at least --max_vocab_size "
                        f"({opts.max_vocab_size})")
    for split in ("valid", "test"):
        docs, fraction = getattr(opts, f"{split}_docs"), getattr(opts, f"{split}_fraction")
        if docs is not None and fraction is not None:
            raise UserError(f"--{split}_docs and --{split}_fraction both given; pass one")
        if docs is not None and docs < 0:
            raise UserError(f"--{split}_docs must be >= 0")
        if fraction is not None and not 0 <= fraction < 1:
            raise UserError(f"--{split}_fraction must be in [0, 1)")


# --------------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------------
def list_inputs(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """The input files: files as given, folders recursively (hidden entries skipped) in name order."""
    files: list[Path] = []
    if not paths:
        raise UserError("no input given; pass files or folders to read")
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file()
                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
            if not found:
                raise UserError(f"{p}: folder has no files; the corpus is empty")
            files += found
        elif p.is_file():
            files.append(p)
        elif p.exists():
            raise UserError(f"{p}: not a regular file or folder")
        else:
            raise UserError(f"{p}: input not found")
    for f in files:
        try:
            with open(f, "rb") as handle:
                handle.read(1)
        except OSError as exc:
            raise UserError(f"{f}: cannot read the input ({exc.strerror or exc}); fix its permissions") from None
    return files


def _strip_compression(path: Path) -> tuple[str, object]:
    suffix = path.suffix.lower()
    if suffix in _DECOMPRESS:
        return Path(path.stem).suffix.lower(), _DECOMPRESS[suffix]
    return suffix, None


class _Source:
    """A binary stream of one input file (decompressed) and how many bytes of the file were read so far."""

    def __init__(self, path: Path):
        self.path = path
        self.ext, opener = _strip_compression(path)
        self.raw = open(path, "rb")
        self.stream = opener(self.raw) if opener else self.raw
        self._text = None

    def text(self) -> io.TextIOWrapper:
        """The stream as UTF-8 text with universal newlines (held here: a dropped wrapper closes the file)."""
        if self._text is None:
            self._text = io.TextIOWrapper(self.stream, encoding="utf-8", newline=None)
        return self._text

    def consumed(self) -> int:
        return self.raw.tell()

    def close(self) -> None:
        if self._text is not None:
            self._text.close()
        self.stream.close()
        self.raw.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def detect_format(path: Path, forced: str) -> str:
    if forced != "auto":
        return forced
    ext, _ = _strip_compression(path)
    if ext in (".jsonl", ".ndjson"):
        return "jsonl"
    with _Source(path) as src:
        try:
            head = src.stream.read(1 << 12)
        except _READ_ERRORS as exc:
            raise UserError(f"{path}: cannot read the input ({exc}); is the file complete?") from None
    text = head.lstrip(b"\xef\xbb\xbf").lstrip()
    if text.startswith(b"["):
        return "json"
    if text.startswith(b"{"):
        return "jsonl"
    if text.startswith(b"<doc ") or text.startswith(b"<doc>"):
        return "wikiextractor"
    return "text"


@dataclasses.dataclass
class Chunk:
    """Consecutive records of one file: `lines` (raw JSON lines, bytes, parsed by the worker) or `records`
    ((text, ends_article) pairs; an article longer than a chunk comes in several records)."""

    index: int
    source: str
    first_line: int
    lines: bytes | None = None
    records: list | None = None


def _article_text(obj, opts: Options, where: str) -> str | None:
    """The text of one parsed JSON article (title first when title_key is set); None to skip it."""
    if not isinstance(obj, dict):
        if opts.skip_bad_lines:
            return None
        raise UserError(f"{where}: not a JSON object; one article per line or array element is expected "
                        "(or pass --skip_bad_lines)")
    text = obj.get(opts.text_key)
    if not isinstance(text, str):
        if opts.skip_bad_lines:
            return None
        what = "has no" if text is None else "has a non-string"
        keys = ", ".join(list(map(str, obj))[:8])
        raise UserError(f"{where}: the article {what} {opts.text_key!r} key (its keys: {keys}); pass --text_key "
                        "with the key that holds the text (or --skip_bad_lines)")
    if opts.title_key:
        title = obj.get(opts.title_key)
        if isinstance(title, str) and title.strip():
            text = title + "\n" + text
    return text


class _Reader:
    """Cuts the inputs into chunks (the same for any number of workers) and reports the bytes read."""

    def __init__(self, files: list[Path], opts: Options, on_bytes=None):
        self.files, self.opts, self.on_bytes = files, opts, on_bytes or (lambda n: None)
        self.bad_lines = 0  # records skipped by the reader itself (JSON arrays)

    def __iter__(self) -> Iterator[Chunk]:
        index = 0
        for path in self.files:
            fmt = detect_format(path, self.opts.input_format)
            with _Source(path) as src:
                done = 0
                try:
                    for chunk_args in getattr(self, f"_{fmt}")(src):
                        now = src.consumed()
                        self.on_bytes(now - done)
                        done = now
                        yield Chunk(index, str(path), *chunk_args)
                        index += 1
                except _READ_ERRORS as exc:
                    raise UserError(f"{path}: cannot read the input ({exc}); is the file complete?") from None
                except UnicodeDecodeError as exc:
                    raise UserError(f"{path}: not valid UTF-8 ({exc.reason} at byte {exc.start} of a block); "
                                    "convert it to UTF-8") from None
                self.on_bytes(path.stat().st_size - done)

    # each format yields (first_line, lines, records)
    def _jsonl(self, src: _Source):
        """Blocks of whole lines (the worker parses them)."""
        pending, line = b"", 1
        while block := src.stream.read(self.opts.chunk_bytes):
            data = pending + block if pending else block
            cut = data.rfind(b"\n") + 1
            if cut == 0:
                pending = data
                continue
            yield line, data[:cut], None
            line += data.count(b"\n", 0, cut)
            pending = data[cut:]
        if pending:
            yield line, pending, None

    def _text_lines(self, src: _Source):
        return src.text()

    def _grouped(self, records: Iterator[tuple[int, str, bool]]):
        """Group (line, text, ends) records into chunks of about chunk_bytes."""
        out, size, first = [], 0, 1
        for line_no, text, ends in records:
            if not out:
                first = line_no
            out.append((text, ends))
            size += len(text)
            if size >= self.opts.chunk_bytes:
                yield first, None, out
                out, size = [], 0
        if out:
            yield first, None, out

    def _text(self, src: _Source):
        if self.opts.text_docs == "paragraph":
            return self._grouped(self._paragraphs(src.text()))
        return self._grouped(self._text_records(self._text_lines(src)))

    @staticmethod
    def _paragraphs(text: io.TextIOWrapper, block_chars: int = 1 << 22):
        """The records of text_docs='paragraph', exactly as _text_records makes them, from blocks of lines: a
        Python loop over lines was a large part of the main process's time. A line is blank where str.strip()
        would leave nothing (empty, or str.isspace())."""
        carry, line_no = "", 1  # line_no: the number of the first line of the next block
        buf, start = [], 1  # the paragraph being built (it may go on over blocks) and its first line
        while True:
            block = text.read(block_chars)
            data = carry + block
            if block:
                cut = data.rfind("\n") + 1
                if cut == 0:
                    carry = data
                    continue
                data, carry = data[:cut], data[cut:]
            if not data:
                break
            lines = data.split("\n")
            complete = lines[-1] == ""  # data ends with a newline (always, except for a last line at the end)
            if complete:
                lines.pop()
            blank = [i for i, line in enumerate(lines) if not line or line.isspace()]
            blank.append(len(lines))  # (the end of the block: not a blank line)
            prev = -1
            for b in blank:
                if b > prev + 1:
                    if not buf:
                        start = line_no + prev + 1
                    buf.append("\n".join(lines[prev + 1 : b]) + ("\n" if b < len(lines) or complete else ""))
                if b < len(lines) and buf:
                    yield start, "".join(buf), True
                    buf = []
                prev = b
            line_no += len(lines)
            if not block:
                break
        if buf:
            yield start, "".join(buf), True

    def _text_records(self, lines):
        mode, limit = self.opts.text_docs, self.opts.chunk_bytes
        buf, size, start, any_line = [], 0, 1, False
        for line_no, line in enumerate(lines, 1):
            any_line = True
            if mode == "line":
                if line.strip():
                    yield line_no, line, True
                continue
            if mode == "paragraph" and not line.strip():
                if buf:
                    yield start, "".join(buf), True
                buf, size = [], 0
                continue
            if not buf:
                start = line_no
            buf.append(line)
            size += len(line)
            if mode == "file" and size >= limit:  # a long article goes on in the next record
                yield start, "".join(buf), False
                buf, size = [], 0
        if buf or (mode == "file" and any_line):  # a file's last record ends its article (even when empty)
            yield start, "".join(buf), True

    def _wikiextractor(self, src: _Source):
        def records():
            buf, start, inside = [], 1, False
            for line_no, line in enumerate(self._text_lines(src), 1):
                if not inside and line.startswith("<doc"):
                    buf, start, inside = [], line_no, True
                elif inside and line.rstrip() == "</doc>":
                    inside = False
                    yield start, "".join(buf), True
                elif inside:
                    buf.append(line)
            if inside:
                yield start, "".join(buf), True

        return self._grouped(records())

    def _json(self, src: _Source):
        def records():
            text = self._text_lines(src)
            decoder = json.JSONDecoder()
            buf, pos, element, eof = "", 0, 0, False

            def fill():
                nonlocal buf, pos, eof
                more = text.read(1 << 20)
                eof = not more
                buf = buf[pos:] + more
                pos = 0

            def skip(chars):
                nonlocal pos
                while True:
                    while pos < len(buf) and (buf[pos].isspace() or buf[pos] in chars):
                        pos += 1
                    if pos < len(buf) or eof:
                        return
                    fill()

            fill()
            skip("\ufeff")
            if pos >= len(buf) or buf[pos] != "[":
                raise UserError(f"{src.path}: not a JSON array (it should start with '['); use --format")
            pos += 1
            while True:
                skip(",")
                if pos >= len(buf):
                    raise UserError(f"{src.path}: the JSON array is not closed (a ']' is missing); is the file "
                                    "complete?")
                if buf[pos] == "]":
                    return
                while True:
                    try:
                        obj, end = decoder.raw_decode(buf, pos)
                        break
                    except json.JSONDecodeError as exc:
                        if eof:
                            if self.opts.skip_bad_lines:
                                self.bad_lines += 1
                                return
                            raise UserError(f"{src.path}: array element {element + 1} is not valid JSON "
                                            f"({exc.msg}); fix it or pass --skip_bad_lines") from None
                        fill()
                pos = end
                element += 1
                article = _article_text(obj, self.opts, f"{src.path}: array element {element}")
                if article is None:
                    self.bad_lines += 1
                else:
                    yield element, article, True

        return self._grouped(records())


# --------------------------------------------------------------------------------------------------------
# Workers: tokenizing, counting, encoding one chunk
# --------------------------------------------------------------------------------------------------------
_WORKER: dict = {}  # the options (and the Moses tokenizer) of the worker processes


def _set_worker(opts: Options, bpe_json: str | None = None) -> None:
    _WORKER.clear()
    _WORKER.update(opts=opts)
    if bpe_json is not None:
        from tokenizers import Tokenizer

        _WORKER["bpe"] = Tokenizer.from_str(bpe_json)
    if opts.moses:
        import sacremoses

        _WORKER["moses"] = sacremoses.MosesTokenizer(lang=opts.moses_lang)


def _records(chunk: Chunk) -> tuple[list[tuple[str, bool]], int]:
    """The chunk's (text, ends_article) records, and how many bad lines were skipped."""
    if chunk.records is not None:
        return chunk.records, 0
    opts: Options = _WORKER["opts"]
    out, bad = [], 0
    for offset, raw in enumerate(chunk.lines.split(b"\n")):
        if not raw.strip():
            continue
        where = f"{chunk.source}: line {chunk.first_line + offset}"
        try:
            obj = json.loads(raw)
        except ValueError as exc:  # also UnicodeDecodeError
            if opts.skip_bad_lines:
                bad += 1
                continue
            reason = getattr(exc, "msg", None) or str(exc)[:80]
            raise UserError(f"{where}: not valid JSON ({reason}); fix the line or pass --skip_bad_lines to skip "
                            "such lines") from None
        text = _article_text(obj, opts, where)
        if text is None:
            bad += 1
        else:
            out.append((text, True))
    return out, bad


def _line_tokens(line: str) -> list[str]:
    opts: Options = _WORKER["opts"]
    if opts.lower_case:
        line = line.lower()
    if opts.moses and line.strip():
        line = _WORKER["moses"].tokenize(line, return_str=True, escape=False)
    if opts.level == "char":
        return list(line.strip())
    return line.split()


def _tokens(records) -> tuple[list[str], list[int]]:
    """All symbols of the records (each non-empty line then <eos>, each article then the separator) and the
    number of symbols of each record."""
    opts: Options = _WORKER["opts"]
    tokens: list[str] = []
    lengths = []
    for text, ends in records:
        before = len(tokens)
        for line in text.split("\n"):
            symbols = _line_tokens(line)
            if symbols:
                tokens += symbols
                tokens.append(EOS)
        if ends:
            tokens.append(opts.doc_separator)
        lengths.append(len(tokens) - before)
    return tokens, lengths


class _Joined:
    """A chunk's symbols without Python strings: their UTF-8 bytes joined by newlines, their keys (int64, as
    symbol_keys gives), how many, and where the special symbols are among them (-1: not there)."""

    def __init__(self, data: bytes, keys: np.ndarray, n: int, special_at: list[int]):
        self.data, self.keys, self.n, self.special_at = data, keys, n, special_at

    def strings(self) -> list[str]:
        return self.data.decode("utf-8").split("\n") if self.n else []


def _find_word(block: WordBlock, symbol: str) -> int:
    """The index of `symbol` among the block's symbols, or -1: among those of its key, compared by bytes."""
    key = fast_words.symbol_keys([symbol])[0]
    for at in np.flatnonzero(block.keys == key).tolist():
        if key < np.uint64(1 << 63) or block.decode(np.array([at]))[0] == symbol:  # (a short key is exact)
            return at
    return -1


def _fast_word_ids(records) -> tuple[np.ndarray, "list[str] | _Joined", np.ndarray] | None:
    """What the Python path (`_tokens`, then first-seen numbering) makes of the records at word level, through
    utils.data.fast_words (numpy on the UTF-8 bytes; no Python string per token, and usually none per symbol):
    (ids in first-seen order over the whole stream, uint32; the symbols, as a list or a _Joined; each record's
    length). None where it does not apply (Moses, characters, lower-casing of non-ASCII text, non-ASCII
    whitespace, a hash collision): the caller then takes the Python path, so the result never depends on
    which path ran."""
    opts: Options = _WORKER["opts"]
    if opts.level != "word" or opts.moses or not records:
        return None
    # One text: the records joined by newlines, each line of each record (text.split("\n")) one line of it.
    joined = "\n".join(text for text, _ in records) + "\n"
    if opts.lower_case:
        if not joined.isascii():  # (per-line str.lower of non-ASCII text can depend on context: final sigma)
            return None
        joined = joined.lower()
    block = scan_words(joined)
    if block is None:
        return None
    n_words = len(block.keys)
    raw = block.ids(np.arange(n_words))  # word numbers in first-seen order, -2 at the end of each line
    extra = []  # <eos> and the separator: their word number when the text has them as words, else new ones
    codes = []
    for special in (EOS, opts.doc_separator):
        at = _find_word(block, special)
        if at >= 0:
            codes.append(at)
        elif special in extra:
            codes.append(n_words + extra.index(special))
        else:
            codes.append(n_words + len(extra))
            extra.append(special)
    eos_code, sep_code = codes
    marks = np.flatnonzero(raw < 0)  # the end of each line
    line_words = np.diff(marks, prepend=-1) - 1
    nonempty = line_words > 0
    stream = raw.copy()
    stream[marks] = np.where(nonempty, eos_code, -1)  # a non-empty line ends with <eos>; an empty one adds nothing
    lines_per_record = np.fromiter((text.count("\n") + 1 for text, _ in records), np.int64, len(records))
    record_last_line = np.cumsum(lines_per_record) - 1
    ends = np.fromiter((e for _, e in records), np.bool_, len(records))
    at = marks[record_last_line[ends]] + 1
    stream = np.insert(stream, at, sep_code)  # the separator closes an article
    special = raw < 0
    special = np.insert(special, at, True)
    keep = stream >= 0
    stream, special = stream[keep], special[keep]
    line_tokens = line_words + nonempty
    lengths = np.add.reduceat(line_tokens, record_last_line - lines_per_record + 1) + ends
    # renumber in first-seen order over the whole stream (the words are in that order among themselves)
    if min(eos_code, sep_code) >= n_words:  # (the usual case: neither special is a word of the text)
        ids, number, placed = _insert_specials(stream, extra, n_words)
        return ids, _joined_symbols(block, number, placed, extra, opts), lengths
    words = block.symbols
    n = len(stream)
    first = np.full(n_words + len(extra), n, np.int64)
    is_word = np.flatnonzero(~special)  # the text's own words (not <eos> and separators added)
    w = stream[is_word]
    new = np.ones(len(w), np.bool_)
    new[1:] = w[1:] > np.maximum.accumulate(w)[:-1]
    first[w[new]] = is_word[new]
    for code in (eos_code, sep_code):  # (the text may hold them as words too: the earlier of the two)
        where = np.flatnonzero(stream == code)
        if len(where):
            first[code] = min(first[code], where[0])
    order = np.argsort(first, kind="stable")
    order = order[first[order] < n]
    number = np.empty(len(first), np.int64)
    number[order] = np.arange(len(order))
    every = words + extra
    return number[stream].astype(np.uint32), _pick(every, order), lengths


def _insert_specials(stream: np.ndarray, extra: list[str], n_words: int) -> tuple[np.ndarray, np.ndarray, list]:
    """(ids, number, placed) of `stream` numbered in first-seen order, where words 0 .. n_words - 1 are already
    in that order and the codes n_words + i (extra[i], not words of the text) are not: each extra symbol takes
    its place after the words seen before its first occurrence (the words after it move up by one). `number`
    maps old codes to new ones; `placed`: (first position, words before it, code) of the extras that occur."""
    placed = []  # (first position, words before it, code)
    for i in range(len(extra)):
        at = np.flatnonzero(stream == n_words + i)
        if len(at):
            before = stream[: at[0]]
            before = before[before < n_words]
            placed.append((int(at[0]), int(before.max()) + 1 if len(before) else 0, n_words + i))
    placed.sort()
    number = np.arange(n_words + len(extra), dtype=np.int64)
    shift = np.zeros(n_words + 1, np.int64)
    for rank, (_, k, code) in enumerate(placed):
        shift[k] += 1
        number[code] = k + rank
    number[:n_words] += np.cumsum(shift)[:n_words]
    return number[stream].astype(np.uint32), number, placed


def _joined_symbols(block: WordBlock, number: np.ndarray, placed: list, extra: list[str], opts: Options) -> _Joined:
    """The block's words with the placed extra symbols among them (see _insert_specials), as a _Joined."""
    n_words = len(block.keys)
    n = n_words + len(placed)
    keys = np.empty(n, np.uint64)
    keys[number[:n_words]] = block.keys
    data = block.joined() + b"\n" if n_words else b""  # each word followed by a newline
    word_ends = np.cumsum(block.lengths + 1)  # (bytes: a symbol's UTF-8 is whole)
    pieces, done = [], 0
    for _, k, code in placed:  # (in order: k does not decrease)
        name = extra[code - n_words]
        keys[number[code]] = fast_words.symbol_keys([name])[0]
        cut = int(word_ends[k - 1]) if k else 0
        pieces += [data[done:cut], name.encode("utf-8") + b"\n"]
        done = cut
    pieces.append(data[done:])
    special_at = []
    for special in opts.specials():
        if special in extra:
            code = n_words + extra.index(special)
            special_at.append(int(number[code]) if any(c == code for _, _, c in placed) else -1)
        else:
            at = _find_word(block, special)
            special_at.append(int(number[at]) if at >= 0 else -1)
    return _Joined(b"".join(pieces)[:-1], keys.view(np.int64), n, special_at)


def _bpe_ids(records) -> tuple[np.ndarray, list[int]]:
    """BPE ids of the records (each record's text whole; <|endoftext|> closes an article), and their lengths."""
    tokenizer = _WORKER["bpe"]
    lower = _WORKER["opts"].lower_case
    eot = tokenizer.token_to_id(EOT)
    encodings = tokenizer.encode_batch([t.lower() if lower else t for t, _ in records], add_special_tokens=False)
    parts = [e.ids + [eot] if ends else e.ids for e, (_, ends) in zip(encodings, records)]
    ids = np.fromiter(itertools.chain.from_iterable(parts), np.uint32)
    return ids, [len(p) for p in parts]


def _write_chunk(path: Path, ids, symbols: "list[str] | _Joined", lengths, ends, bad: int, keys=None,
                 key_order=None, symbol_counts=None, symbol_firsts=None) -> None:
    # no symbol holds a newline (lines are split on it first, and doc_separator has no whitespace), so the
    # symbol list is stored newline-joined; `keys` (symbol_keys of the symbols) and their sorting order are
    # kept so that _resolve need not compute them again, and each symbol's count and first position so that
    # _assemble's exact count need not read the ids
    extra = {} if keys is None else {"keys": keys, "key_order": key_order, "symbol_counts": symbol_counts,
                                     "symbol_firsts": symbol_firsts}
    joined = symbols.data if isinstance(symbols, _Joined) else "\n".join(symbols).encode("utf-8")
    n = symbols.n if isinstance(symbols, _Joined) else len(symbols)
    with atomic_open(path, "wb", sync_dir=False) as f:  # (the folder is fsynced once, at the end of _count)
        np.savez(f, ids=ids, symbols=np.frombuffer(joined, np.uint8), n_symbols=np.int64(n),
                 lengths=np.asarray(lengths, np.int64), ends=np.asarray(ends, np.bool_), bad=np.int64(bad), **extra)


def read_chunk(path: Path, only: tuple[str, ...] | None = None) -> dict:
    """A chunk file: ids (chunk-local, uint32), symbols (local id -> symbol), the records' lengths and ends
    (`only`: just those arrays, and the symbols)."""
    with np.load(path) as z:
        chunk = {k: z[k] for k in z.files if only is None or k in only or k in ("symbols", "n_symbols")}
    text = chunk.pop("symbols").tobytes().decode("utf-8")
    chunk["symbols"] = text.split("\n") if int(chunk["n_symbols"]) else []
    return chunk


def tokenize_chunk(job: tuple[Chunk | None, Path]) -> tuple[np.ndarray, np.ndarray, int, int, int]:
    """Tokenize one chunk into `path` (chunk-local ids, in first-seen order, and the local symbol list); a
    chunk already written (`chunk` None: a resumed run) is read back instead.
    Returns (symbol keys, counts) without the special symbols, articles ended, symbols in all, bad lines."""
    chunk, path = job
    if chunk is None:
        data = read_chunk(path)
        symbols, ids, ends, bad = data["symbols"], data["ids"], data["ends"], int(data["bad"])
        if "bpe" in _WORKER:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), int(np.sum(ends)), len(ids), bad
    elif "bpe" in _WORKER:  # the final ids already: the BPE's, <|endoftext|> after each article
        records, bad = _records(chunk)
        ids, symbols, ends = _bpe_ids(records), [], [e for _, e in records]
        _write_chunk(path, ids[0], symbols, ids[1], ends, bad)
        return np.zeros(0, np.int64), np.zeros(0, np.int64), int(np.sum(ends)), len(ids[0]), bad
    else:
        records, bad = _records(chunk)
        fast = _fast_word_ids(records)
        if fast is not None:
            ids, symbols, lengths = fast
        else:
            tokens, lengths = _tokens(records)
            table = dict(zip(dict.fromkeys(tokens), itertools.count()))  # first-seen order, at C speed
            ids = np.fromiter(map(table.__getitem__, tokens), np.uint32, len(tokens))
            symbols = list(table)
        ends = [e for _, e in records]
        keys = symbols.keys if isinstance(symbols, _Joined) else symbol_keys(symbols)
        order = np.argsort(keys)
        counts = np.bincount(ids, minlength=len(keys))
        _write_chunk(path, ids, symbols, lengths, ends, bad, keys, order, counts, _first_positions(ids))
    if chunk is None:  # (keys and order as stored, or made again for a chunk written without them)
        keys = data["keys"] if "keys" in data else symbol_keys(symbols)
        order = data["key_order"] if "key_order" in data else np.argsort(keys)
    if isinstance(symbols, _Joined):
        n_symbols, special_at = symbols.n, symbols.special_at
    else:
        n_symbols = len(symbols)
        special_at = [_find(symbols, keys, special) for special in _WORKER["opts"].specials()]
    if chunk is None:
        counts = np.bincount(ids, minlength=n_symbols)
    keep = np.ones(n_symbols, np.bool_)
    for at in special_at:
        if at >= 0:
            keep[at] = False
    # sorted and distinct (two symbols with one hash count as one: their counts summed), so that the main
    # process's merge need not sort: that work is spread over the workers
    order = order[keep[order]]
    keys, counts = keys[order], counts[order]
    if len(keys):
        start = np.flatnonzero(np.concatenate(([True], keys[1:] != keys[:-1])))
        keys, counts = keys[start], np.add.reduceat(counts, start)
    return keys, counts.astype(np.int64), int(np.sum(ends)), len(ids), bad


def _first_positions(ids: np.ndarray) -> np.ndarray:
    """Where each local id first occurs (local ids are numbered in first-seen order: a token is the first of its
    symbol where it exceeds every id before it)."""
    new = np.ones(len(ids), np.bool_)
    if len(ids):
        new[1:] = ids[1:] > np.maximum.accumulate(ids)[:-1]
    return np.flatnonzero(new)


def ordered_map(fn, items: Iterable, workers: int, initializer=None, initargs: tuple = (),
                window: int | None = None) -> Iterator:
    """fn over items, results in input order (so that what is merged from them is merged in the same order
    for any number of workers): in this process (workers 1), or in a pool of `workers` processes with at
    most `window` items in flight (the pool's own imap would read the whole input ahead)."""
    if workers <= 1:
        if initializer is not None:
            initializer(*initargs)
        yield from map(fn, items)
        return
    window = window or 2 * workers
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    with ctx.Pool(workers, initializer=initializer, initargs=initargs) as pool:
        pending: collections.deque = collections.deque()
        for item in items:
            pending.append(pool.apply_async(fn, (item,)))
            if len(pending) >= window:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


# --------------------------------------------------------------------------------------------------------
# Pass 1: bounded counting
# --------------------------------------------------------------------------------------------------------
def _merged(array: np.ndarray, old: np.ndarray, slots: np.ndarray, values) -> np.ndarray:
    out = np.empty(len(old), array.dtype)
    out[slots] = values
    out[old] = array
    return out


class BoundedCounter:
    """Misra-Gries summary with batched decrements, at most 2 * capacity keys (int64: the symbols' hashes).

    For key row i: `counts[i]` is its decremented count c, `entered[i]` the total decrement D0 when it last
    entered the summary, `decrement` the total D so far. A symbol keeps every occurrence since it entered
    less the decrements since, and loses at most D in all, so `c + D - D0 <= f <= c + D` (f: its true count;
    f <= D for a symbol not in the summary). The lower bound is close to f for the frequent symbols, which
    entered early, so the cut-off below is nearly the true one. The keys are kept sorted in numpy arrays, so
    that merging a chunk's counts is a few vectorized passes (a dict of strings cost a cache miss per symbol,
    and was half the time of the pass with two workers)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.keys = np.zeros(0, np.int64)
        self.counts = np.zeros(0, np.int64)
        self.entered = np.zeros(0, np.int64)
        self.decrement = 0
        self.prunes = 0
        self.peak = 0

    def __len__(self) -> int:
        return len(self.keys)

    def update(self, keys: np.ndarray, counts: np.ndarray) -> None:
        """Add the counts of symbols (keys may repeat: equal hashes count as one symbol)."""
        keys = np.asarray(keys, np.int64)
        if len(keys) > 1 and not (keys[1:] > keys[:-1]).all():  # (tokenize_chunk's are sorted and distinct)
            keys, inverse = np.unique(keys, return_inverse=True)
            counts = np.bincount(inverse.reshape(-1), weights=counts, minlength=len(keys)).astype(np.int64)
        counts = np.asarray(counts, np.int64)
        pos = np.searchsorted(self.keys, keys)
        found = pos < len(self.keys)
        found[found] = self.keys[pos[found]] == keys[found]
        self.counts[pos[found]] += counts[found]  # keys are distinct
        new = ~found
        if new.any():  # keys is sorted, so are the new ones: one insert keeps self.keys sorted
            # (np.insert's work, with the slots computed once for the three arrays: new key j goes before
            # old key at[j], after the new ones before it)
            at = pos[new]
            slots = at + np.arange(len(at))
            old = np.ones(len(self.keys) + len(at), np.bool_)
            old[slots] = False
            self.keys = _merged(self.keys, old, slots, keys[new])
            self.counts = _merged(self.counts, old, slots, counts[new])
            self.entered = _merged(self.entered, old, slots, self.decrement)
        self.peak = max(self.peak, len(self.keys))
        if len(self.keys) > 2 * self.capacity:
            self.prune()

    def prune(self) -> None:
        k = len(self.counts) - self.capacity - 1  # the (capacity+1)-th largest count goes to zero, and all below
        cut = int(np.partition(self.counts, k)[k])
        keep = self.counts > cut
        self.keys, self.counts, self.entered = self.keys[keep], self.counts[keep] - cut, self.entered[keep]
        self.decrement += cut
        self.prunes += 1

    def candidates(self, max_size: int | None, min_freq: int) -> tuple[np.ndarray, int, bool]:
        """(candidate keys, sorted; cut-off T; exact): every key of the summary whose true count may reach T.

        T is the max_size-th largest lower bound (or min_freq when larger): max_size symbols have f >= T, so a
        symbol with f < T is not in the top max_size. A symbol outside the summary has f <= D: when T > D
        (`exact`) the candidates hold the whole top max_size, and their exact counts give it exactly."""
        threshold = max(min_freq, 1)
        upper = self.counts + self.decrement
        lower = upper - self.entered
        if max_size is not None and len(lower) >= max_size:
            threshold = max(threshold, int(np.partition(lower, len(lower) - max_size)[len(lower) - max_size]))
        exact = self.decrement == 0 or threshold > self.decrement
        if max_size is None and min_freq == 0 and self.decrement:
            exact = False
        return self.keys[upper >= threshold], threshold, exact


def symbol_keys(symbols: list[str]) -> np.ndarray:
    """The summary's keys of symbols (int64): utils.data.fast_words's 64-bit keys, which the numpy word path
    gives every symbol without making it a string (a symbol of up to 7 bytes is its own key; a longer one's
    is a hash of its bytes, the same in every process and run)."""
    return fast_words.symbol_keys(symbols).view(np.int64)


_RESOLVING: dict = {}  # the candidate keys, in the worker processes of _resolve


def _set_resolving(keys: np.ndarray, opts: Options) -> None:
    _RESOLVING.update(keys=keys, opts=opts)


def _chunk_hits(path: Path) -> tuple[int, np.ndarray, np.ndarray, list[str], int, int]:
    """A chunk's symbols whose key is a candidate key (in a worker): (number of symbols, their local ids, the
    keys' positions, their strings, the local id of <eos> and of the separator or -1). Only those symbols are
    decoded."""
    keys, opts = _RESOLVING["keys"], _RESOLVING["opts"]
    with np.load(path) as z:
        raw, n_symbols = z["symbols"], int(z["n_symbols"])
        stored = "keys" in z.files  # (a chunk written without them: made again)
        mine = z["keys"] if stored else None
        order = z["key_order"] if stored else None
    if not stored:
        mine = symbol_keys(raw.tobytes().decode("utf-8").split("\n") if n_symbols else [])
        order = np.argsort(mine)
    pos = np.empty(len(mine), np.int64)
    pos[order] = np.searchsorted(keys, mine[order])  # (sorted needles: each search starts where the last ended)
    pos = np.minimum(pos, max(len(keys) - 1, 0))
    hit = np.flatnonzero((keys[pos] == mine) if len(keys) else np.zeros(len(mine), np.bool_))
    starts = np.concatenate(([0], np.flatnonzero(raw == 10) + 1)) if n_symbols else np.zeros(0, np.int64)
    specials = []
    for special in (EOS, opts.doc_separator):
        key = fast_words.symbol_keys([special]).view(np.int64)[0]
        found = [at for at in np.flatnonzero(mine == key).tolist() if _symbols_at(raw, starts, np.array([at])) == [special]]
        specials.append(found[0] if found else -1)
    return n_symbols, hit, pos[hit], _symbols_at(raw, starts, hit), *specials


def _symbols_at(raw: np.ndarray, starts: np.ndarray, which: np.ndarray) -> list[str]:
    """Symbols `which` of a chunk file's newline-joined symbol bytes `raw` (`starts`: where each begins)."""
    if not len(which):
        return []
    first = starts[which]
    size = np.append(starts[1:], len(raw) + 1)[which] - first  # each symbol and the newline after it
    at = np.cumsum(size) - size
    padded = np.append(raw, np.uint8(10))  # (the last symbol's newline)
    text = padded[np.repeat(first - at, size) + np.arange(int(size.sum()))].tobytes().decode("utf-8")
    return text.split("\n")[:-1]


def _find(symbols: list[str], keys: np.ndarray, symbol: str) -> int:
    """symbols.index(symbol) (the symbols are distinct), or -1: among the symbols of its key (symbol_keys)."""
    for at in np.flatnonzero(keys == fast_words.symbol_keys([symbol]).view(np.int64)[0]).tolist():
        if symbols[at] == symbol:
            return at
    return -1


def _pick(items: list, at: np.ndarray) -> list:
    """[items[i] for i in at], gathered at C speed."""
    if len(at) < 2:
        return [items[i] for i in at.tolist()]
    return list(operator.itemgetter(*at.tolist())(items))


def _resolve(work: Path, n_chunks: int, keys: np.ndarray, opts: Options, workers: int = 1) -> list[str]:
    """The symbols of the candidate keys (sorted), found in the chunk files, in first-seen order.

    On the way it writes each chunk's map from local id to candidate number (`.candidate.npy`, what _assemble
    would otherwise make with a dict look-up per symbol): the candidate numbers are those first-seen numbers,
    <eos> k, the separator k + 1, anything else k + 2 (<unk>), k = len(keys). A symbol whose key is not a
    candidate's is not one (equal strings have equal hashes); one whose key is, is compared with the
    candidate's string, and a chunk where a hash matched another string (a collision) gets no map: _assemble
    then maps it by strings. The chunks are read and searched (with the keys kept in their files) by
    `workers` processes, numbered here in chunk order."""
    names: list[str] = []
    number = np.full(len(keys), -1, np.int64)  # key -> candidate number, once seen
    k = len(keys)
    for stale in (work / "chunks").glob("*.candidate.npy"):  # (a killed run's, made with another hash seed)
        stale.unlink()
    paths = [_chunk_file(work, i) for i in range(n_chunks)]
    hits = ordered_map(_chunk_hits, paths, workers, _set_resolving, (keys, opts))
    for path, (n_symbols, hit, pos, strings, eos, separator) in zip(paths, hits):
        unseen = np.flatnonzero(number[pos] < 0)
        if len(unseen):  # each candidate once, in first-seen order (local ids are in first-seen order)
            first = np.sort(np.unique(pos[unseen], return_index=True)[1])
            number[pos[unseen[first]]] = len(names) + np.arange(len(first))
            names += _pick(strings, unseen[first])
        candidate = np.full(n_symbols, k + 2, np.int64)
        candidate[hit] = number[pos]
        if strings != _pick(names, number[pos]):
            continue  # a hash collision: _assemble maps this chunk by strings
        for code, at in ((k, eos), (k + 1, separator)):
            if at >= 0:
                candidate[at] = code
        with atomic_open(path.with_suffix(".candidate.npy"), "wb", sync_dir=False) as f:  # (as the chunks)
            np.save(f, candidate.astype(np.int32 if k + 3 < 2**31 else np.int64))
    if len(names) != k:  # (cannot happen: every key came from a chunk) the maps would be wrong: drop them
        for made in (work / "chunks").glob("*.candidate.npy"):
            made.unlink()
    return names


# --------------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------------
def _progress_bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc=desc, file=sys.stderr,
                dynamic_ncols=True, mininterval=1.0)


def _say(verbose: bool, message: str) -> None:
    if verbose:
        print(message, flush=True)


class _Hashing:
    """A binary file that hashes what is written to it: a written file's sha256 without reading it back."""

    def __init__(self, f):
        self.f, self.sha256, self.bytes = f, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha256.update(data)
        self.bytes += memoryview(data).nbytes
        return self.f.write(data)


def _save_npy(path: Path, array: np.ndarray) -> dict:
    """np.save's bytes of `array` into `path`, atomically (fsynced; the caller fsyncs the folder once the
    files are all there): {"bytes", "sha256"} of what was written."""
    with atomic_open(path, "wb", sync_dir=False) as f:
        hashing = _Hashing(f)
        np.lib.format.write_array(hashing, array, allow_pickle=False)
    return {"bytes": hashing.bytes, "sha256": hashing.sha256.hexdigest()}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def id_dtype(vocab_size: int) -> np.dtype:
    for dtype in (np.uint16, np.uint32):
        if vocab_size <= np.iinfo(dtype).max + 1:
            return np.dtype(dtype)
    return np.dtype(np.uint64)


def _split_sizes(n_docs: int, opts: Options) -> tuple[int, int]:
    sizes = []
    for split in ("valid", "test"):
        docs, fraction = getattr(opts, f"{split}_docs"), getattr(opts, f"{split}_fraction")
        if docs is None:
            fraction = 0.001 if fraction is None else fraction  # the 1000:1:1 of large-batch LM work
            docs = max(1, round(fraction * n_docs)) if fraction > 0 else 0
        sizes.append(docs)
    if sizes[0] + sizes[1] >= n_docs:
        raise UserError(f"the corpus has {n_docs} article(s): {sizes[0]} for validation and {sizes[1]} for test leave "
                        "none for training; pass smaller --valid_docs/--test_docs (or fractions)")
    return sizes[0], sizes[1]


def split_of_docs(n_docs: int, opts: Options) -> np.ndarray:
    """Split of each article (0 train, 1 valid, 2 test): valid and test drawn from seed, in corpus order."""
    n_valid, n_test = _split_sizes(n_docs, opts)
    chosen = np.random.default_rng(opts.seed).choice(n_docs, n_valid + n_test, replace=False)
    split = np.zeros(n_docs, np.uint8)
    split[chosen[:n_valid]] = 1
    split[chosen[n_valid:]] = 2
    return split


class _ShardWriter:
    """One split's ids, cut into `<split>.NNNNN.npy` files of `shard_tokens` ids (the last one shorter)."""

    def __init__(self, out: Path, split: str, dtype, shard_tokens: int):
        self.out, self.split, self.dtype, self.shard_tokens = out, split, dtype, shard_tokens
        self.buffer: list[np.ndarray] = []
        self.buffered = 0
        self.shards: list[dict] = []
        self.n = 0

    def append(self, ids: np.ndarray) -> None:
        self.buffer.append(ids.astype(self.dtype, copy=False))
        self.buffered += len(ids)
        self.n += len(ids)
        while self.buffered >= self.shard_tokens:
            self._flush(self.shard_tokens)

    def _flush(self, n: int) -> None:
        ids = np.concatenate(self.buffer) if len(self.buffer) != 1 else self.buffer[0]
        name = f"{self.split}.{len(self.shards):05d}.npy"
        written = _save_npy(self.out / name, np.ascontiguousarray(ids[:n]))
        self.shards.append({"file": name, "n_tokens": int(n), **written})
        rest = ids[n:]
        self.buffer, self.buffered = ([rest] if len(rest) else []), len(rest)

    def finish(self) -> list[dict]:
        if self.buffered or not self.shards:
            self._flush(self.buffered)
        return self.shards


def prepare_corpus(inputs: Sequence[str | os.PathLike], output: str | os.PathLike, opts: Options = Options(),
                   workers: int | None = None, progress: bool = False, verbose: bool = False,
                   overwrite: bool = False) -> dict:
    """Prepare `inputs` into the folder `output` (see the module docstring); returns the manifest."""
    check_options(opts)
    files = list_inputs(inputs)
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: --output exists and is not a folder")
    if (out / "manifest.json").exists() and not overwrite:
        raise UserError(f"{out}: already holds a prepared corpus; pass --overwrite or another --output")
    workers = max(1, workers or os.cpu_count() or 1)
    settle_allocator()  # (before the workers fork: they keep the setting) block-sized arrays without page-fault churn
    if "fork" not in multiprocessing.get_all_start_methods():
        workers = 1  # (the workers get their options by fork)
    total_bytes = sum(f.stat().st_size for f in files)
    work = out / ".work"
    config = {"options": opts.counting_key(), "inputs": [{"path": str(f.resolve()), "bytes": f.stat().st_size,
                                                        "mtime_ns": f.stat().st_mtime_ns} for f in files]}
    if (work / "config.json").exists():
        try:
            same = json.loads((work / "config.json").read_text(encoding="utf-8")) == config
        except (OSError, ValueError):
            same = False
        if not same:
            _say(verbose, f"{work}: left by a run with other inputs or options; starting over")
            shutil.rmtree(work)
        else:
            _say(verbose, f"{work}: resuming the earlier run")
    created = not out.exists()
    if not (work / "config.json").exists():
        write_text_atomic(work / "config.json", json.dumps(config, indent=1))
    started = time.perf_counter()

    # ---- BPE: trained on a sample of the articles (kept in .work) --------------------------------------------
    bpe_json = None
    if opts.level == "bpe":
        bpe_file = work / "bpe.json"
        if not bpe_file.exists():
            try:
                trained = _train_bpe(files, opts, verbose)
            except UserError:
                shutil.rmtree(work, ignore_errors=True)
                if created:
                    shutil.rmtree(out, ignore_errors=True)
                raise
            write_text_atomic(bpe_file, trained)
        bpe_json = bpe_file.read_text(encoding="utf-8")

    # ---- pass 1: tokenize each chunk once (kept in .work), count with a bound -------------------------------
    pass1_file = work / "pass1.json"
    if pass1_file.exists():
        pass1 = json.loads(pass1_file.read_text(encoding="utf-8"))
    else:
        try:
            pass1 = _count(files, opts, work, workers, total_bytes, progress, bpe_json)
        except UserError:
            shutil.rmtree(work, ignore_errors=True)  # bad input: nothing is left behind
            if created:
                shutil.rmtree(out, ignore_errors=True)
            raise
        write_text_atomic(pass1_file, json.dumps(pass1, ensure_ascii=False))
    counted = "" if bpe_json else (f", summary of {pass1['summary_peak']:,} symbols at most, "
                                   f"{len(pass1['candidates']):,} candidates, error bound D={pass1['decrement']}")
    _say(verbose, f"pass 1: {pass1['n_docs']:,} articles, {pass1['n_tokens']:,} symbols{counted}"
                  + (f", {pass1['bad_lines']:,} bad lines skipped" if pass1["bad_lines"] else ""))
    if not pass1["exact"]:
        print(f"warning: the vocabulary may differ from an exact count's (the counting error bound {pass1['decrement']} "
              f"reaches the cut-off {pass1['threshold']}); raise --count_capacity", file=sys.stderr, flush=True)

    # ---- pass 2: exact counts of the candidates, vocabulary, splits, shards ----------------------------------
    manifest = _assemble(files, opts, pass1, work, out, verbose, progress, bpe_json)
    shutil.rmtree(work, ignore_errors=True)
    seconds = time.perf_counter() - started
    _say(verbose, f"prepared {out} in {seconds:.1f}s ({total_bytes / 1e6 / max(seconds, 1e-9):.1f} MB/s of input)")
    return manifest


def _train_bpe(files, opts: Options, verbose: bool) -> str:
    """A byte-level BPE (GPT-2 style, as BPEVocab's) trained on the first --bpe_sample_mb of article text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    _set_worker(opts)
    sample, size = [], 0
    for chunk in _Reader(files, opts):
        records, _ = _records(chunk)
        for text, _ in records:
            sample.append(text.lower() if opts.lower_case else text)
            size += len(text)
        if size >= opts.bpe_sample_mb * 1e6:
            break
    if not size:
        raise UserError(f"the corpus is empty: no article with text in {', '.join(map(str, files[:3]))}")
    _say(verbose, f"training a byte-level BPE of {opts.bpe_vocab_size:,} tokens on {size / 1e6:.1f} MB of articles")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=opts.bpe_vocab_size, min_frequency=2, special_tokens=[EOT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(sample, trainer)
    return tokenizer.to_str()


def _count(files, opts: Options, work: Path, workers: int, total_bytes: int, progress: bool,
           bpe_json: str | None = None) -> dict:
    bar = _progress_bar(total_bytes, "tokenizing", progress)
    reader = _Reader(files, opts, on_bytes=bar.update if bar else None)
    _set_worker(opts, bpe_json)
    summary = BoundedCounter(opts.count_capacity)
    n_docs = n_tokens = bad = n_chunks = 0

    def jobs():
        for chunk in reader:
            path = _chunk_file(work, chunk.index)
            yield (None if path.exists() else chunk), path  # a resumed run reads the chunks it finished

    try:
        for keys, counts, docs, tokens, skipped in ordered_map(tokenize_chunk, jobs(), workers, _set_worker,
                                                               (opts, bpe_json)):
            summary.update(keys, counts)
            n_docs, n_tokens, bad, n_chunks = n_docs + docs, n_tokens + tokens, bad + skipped, n_chunks + 1
    finally:
        if bar:
            bar.close()
    bad += reader.bad_lines
    if n_docs == 0 or not (len(summary) or (bpe_json and n_tokens > n_docs)):
        raise UserError(f"the corpus is empty: no article with text in {', '.join(map(str, files[:3]))}"
                        f"{' ...' if len(files) > 3 else ''}" + (f" ({bad} bad lines skipped)" if bad else ""))
    if opts.max_vocab_size is None and opts.min_freq == 0 and summary.decrement:
        raise UserError(f"more than {2 * opts.count_capacity:,} distinct symbols: pass --max_vocab_size or --min_freq "
                        "(or a larger --count_capacity) to bound the vocabulary")
    keys, threshold, exact = summary.candidates(opts.max_vocab_size, opts.min_freq) if len(summary) else ([], 0, True)
    candidates = _resolve(work, n_chunks, np.asarray(keys, np.int64), opts, workers) if len(keys) else []
    # Each chunk file and map was fsynced before its rename; their names are made durable here, once, before
    # pass1.json says that they exist (a chunk whose rename was lost in a crash before this would simply be
    # tokenized again).
    fsync_dir(work / "chunks")
    return {"n_docs": n_docs, "n_tokens": n_tokens, "bad_lines": bad, "candidates": candidates, "n_chunks": n_chunks,
            "threshold": threshold, "decrement": summary.decrement, "exact": exact, "prunes": summary.prunes,
            "summary_peak": summary.peak}


def _chunk_file(work: Path, index: int) -> Path:
    return work / "chunks" / f"{index:07d}.npz"


def _chunk_files(work: Path) -> list[Path]:
    return sorted((work / "chunks").glob("*.npz")) if (work / "chunks").exists() else []


def _assemble(files, opts: Options, pass1: dict, work: Path, out: Path, verbose: bool, progress: bool,
              bpe_json: str | None = None) -> dict:
    candidates = pass1["candidates"]
    k = len(candidates)
    table = dict(zip(candidates, range(k)))
    table.update({EOS: k, opts.doc_separator: k + 1})  # and anything else: k + 2 (<unk>)
    chunk_files = [_chunk_file(work, i) for i in range(pass1["n_chunks"])]

    def chunks(desc, counting=False):
        bar = _progress_bar(len(chunk_files), desc, progress)
        for path in chunk_files:
            mapped = path.with_suffix(".candidate.npy")  # chunk-local id -> candidate id, looked up once
            if bpe_json is not None:  # the ids are final
                with np.load(path) as z:
                    data = {key: z[key] for key in ("ids", "lengths", "ends")}
            elif mapped.exists():
                with np.load(path) as z:  # (counting: the symbols' counts and first positions, where kept)
                    wanted = (("symbol_counts", "symbol_firsts", "lengths") if counting and "symbol_counts" in z.files
                              else ("ids", "lengths", "ends"))
                    data = {key: z[key] for key in wanted}
                data["candidate"] = np.load(mapped)
            else:
                data = read_chunk(path)
                data["candidate"] = np.fromiter(map(table.get, data["symbols"], itertools.repeat(k + 2)), np.int64,
                                                len(data["symbols"]))
                with atomic_open(mapped, "wb") as f:
                    np.save(f, data["candidate"].astype(np.int32 if k + 3 < 2**31 else np.int64))
            yield data
            if bar:
                bar.update(1)
        if bar:
            bar.close()

    if bpe_json is not None:
        vocab, fingerprint, n_vocab = bpe_vocab(bpe_json)
        remap, unk = None, -1  # no <unk>: every byte sequence has ids
    else:
        # exact counts and first-seen positions of the candidates
        counts = np.zeros(k + 3, np.int64)
        first = np.full(k + 3, np.iinfo(np.int64).max, np.int64)
        offset = 0
        for data in chunks("counting", counting=True):
            cand = data["candidate"]
            if "symbol_counts" in data:  # kept by the worker
                per_symbol, firsts, n_ids = data["symbol_counts"], data["symbol_firsts"], int(data["lengths"].sum())
            else:
                ids = data["ids"].astype(np.int64)
                per_symbol, firsts, n_ids = np.bincount(ids, minlength=len(cand)), _first_positions(ids), len(ids)
            counts += np.bincount(cand, weights=per_symbol, minlength=k + 3).astype(np.int64)
            where = firsts + offset  # first position of local id 0, 1, 2, ...
            mine = cand < k
            first[cand[mine]] = np.minimum(first[cand[mine]], where[mine])
            offset += n_ids
        order = np.lexsort((first[:k], -counts[:k]))  # by count, ties in first-seen order
        if opts.max_vocab_size is not None:
            order = order[: opts.max_vocab_size]
        if opts.min_freq:
            below = np.flatnonzero(counts[order] < opts.min_freq)
            if len(below):
                order = order[: below[0]]
        specials = opts.specials()
        idx2sym = list(specials) + [candidates[i] for i in order.tolist() if candidates[i] not in specials]
        sym2idx = {s: i for i, s in enumerate(idx2sym)}
        unk = sym2idx[UNK]
        remap = np.full(k + 3, unk, np.int64)
        kept = np.fromiter(map(sym2idx.get, candidates, itertools.repeat(unk)), np.int64, k)
        remap[:k] = kept
        remap[k], remap[k + 1], remap[k + 2] = sym2idx[EOS], sym2idx[opts.doc_separator], unk
        vocab, fingerprint, n_vocab = vocab_dict(idx2sym, opts), vocab_fingerprint(idx2sym), len(idx2sym)
    dtype = id_dtype(n_vocab)

    split_of = split_of_docs(pass1["n_docs"], opts)
    out.mkdir(parents=True, exist_ok=True)
    for stale in list(out.glob("*.npy")) + [out / "manifest.json", out / "vocab.json"]:
        if stale.exists():  # --overwrite: an earlier corpus's files
            stale.unlink()
    writers = {s: _ShardWriter(out, s, dtype, opts.shard_tokens) for s in SPLITS}
    doc_starts: dict[str, list[np.ndarray]] = {s: [np.zeros(1, np.int64)] for s in SPLITS}
    n_unk = dict.fromkeys(SPLITS, 0)
    doc = 0  # global index of the article the next record belongs to
    for data in chunks("writing"):
        ids = data["ids"] if remap is None else remap[data["candidate"]][data["ids"]]
        lengths, ends = data["lengths"], data["ends"]
        rec_doc = doc + np.concatenate(([0], np.cumsum(ends)[:-1])).astype(np.int64)
        doc += int(ends.sum())
        rec_split = split_of[rec_doc]
        tok_split = np.repeat(rec_split, lengths)
        for s, name in enumerate(SPLITS):
            mine = rec_split == s
            if not mine.any():
                continue
            start = writers[name].n
            part = ids[tok_split == s]
            ends_at = start + np.cumsum(lengths[mine])[ends[mine]]
            doc_starts[name].append(ends_at)
            n_unk[name] += int(np.count_nonzero(part == unk)) if unk >= 0 else 0
            writers[name].append(part)
    if doc != pass1["n_docs"]:
        raise RuntimeError(f"pass 2 wrote {doc} articles, pass 1 counted {pass1['n_docs']}")

    write_text_atomic(out / "vocab.json", json.dumps(vocab, ensure_ascii=False), sync_dir=False)
    splits = {}
    for name in SPLITS:
        shards = writers[name].finish()
        starts = np.concatenate(doc_starts[name])
        docs = _save_npy(out / f"{name}.docs.npy", starts)
        n = writers[name].n
        splits[name] = {"n_tokens": n, "n_docs": len(starts) - 1, "n_unk": n_unk[name],
                        "unk_fraction": n_unk[name] / n if n else 0.0, "dtype": dtype.name, "shards": shards,
                        "docs": {"file": f"{name}.docs.npy", **docs}}
    # Every file above was fsynced before its rename: their names are made durable here, once, before the
    # manifest (written last, its own rename fsynced) says that the corpus is complete.
    fsync_dir(out)
    total = sum(s["n_tokens"] for s in splits.values())
    unk_all = sum(n_unk.values())
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "options": dataclasses.asdict(opts),
        "inputs": [{"path": f.name, "bytes": f.stat().st_size} for f in files],
        "n_docs": pass1["n_docs"],
        "n_tokens": total,
        "bad_lines_skipped": pass1["bad_lines"],
        "unk_fraction": unk_all / total if total else 0.0,
        "vocab": {"file": "vocab.json", "size": n_vocab, "fingerprint": fingerprint,
                  "bytes": (out / "vocab.json").stat().st_size, "sha256": _sha256(out / "vocab.json")},
        "counting": {"capacity": opts.count_capacity, "decrement": pass1["decrement"], "threshold": pass1["threshold"],
                     "candidates": k, "exact": pass1["exact"], "prunes": pass1["prunes"]},
        "splits": splits,
    }
    write_text_atomic(out / "manifest.json", json.dumps(manifest, indent=1, ensure_ascii=False))
    _say(verbose, f"vocabulary: {n_vocab:,} symbols; <unk>: {100 * manifest['unk_fraction']:.3f}% of "
                  f"{total:,} tokens; " + ", ".join(f"{s} {splits[s]['n_docs']:,} articles / {splits[s]['n_tokens']:,} "
                                                   f"tokens in {len(splits[s]['shards'])} shard(s)" for s in SPLITS))
    return manifest


# The vocabulary file is what utils.data.vocabulary.Vocab.to_dict writes and Vocab.from_dict reads, written
# here without importing that module (it imports torch, which would cost the preparation time and memory);
# tests/test_prepare_corpus.py checks that Vocab reads it and gets the same fingerprint.
def vocab_dict(idx2sym: list[str], opts: Options) -> dict:
    return {"type": "word", "format": 1, "idx2sym": list(idx2sym), "special": opts.specials(),
            "lower_case": opts.lower_case, "delimiter": "" if opts.level == "char" else None,
            "min_freq": opts.min_freq, "max_size": opts.max_vocab_size, "vocab_file": None}


def vocab_fingerprint(idx2sym: list[str]) -> str:
    fields = {"type": "word", "idx2sym": idx2sym}
    return hashlib.sha256(json.dumps(fields, ensure_ascii=False, sort_keys=True).encode("utf-8")).hexdigest()


def bpe_vocab(tokenizer_json: str, pad_to: int = 8) -> tuple[dict, str, int]:
    """(BPEVocab.to_dict(), BPEVocab.fingerprint(), len(BPEVocab)) of a tokenizer, without importing
    utils.data.vocabulary (torch); the length is padded to a multiple of pad_to, as BPEVocab's."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(tokenizer_json)
    n_real = tokenizer.get_vocab_size(with_added_tokens=True)
    length = -(-n_real // pad_to) * pad_to
    merges = json.loads(tokenizer_json).get("model", {}).get("merges")
    tokens = [tokenizer.id_to_token(i) for i in range(n_real)]
    fields = {"type": "bpe", "tokens": tokens, "merges": merges, "length": length}
    fingerprint = hashlib.sha256(json.dumps(fields, ensure_ascii=False, sort_keys=True).encode("utf-8")).hexdigest()
    return {"type": "bpe", "format": 1, "tokenizer": tokenizer_json, "pad_to": pad_to}, fingerprint, length


def verify(output: str | os.PathLike) -> dict:
    """Check every file of a prepared folder against its manifest (sizes and sha256); returns the manifest."""
    out = Path(output)
    manifest = read_manifest(out)
    entries = [manifest["vocab"]] + [e for s in manifest["splits"].values() for e in s["shards"] + [s["docs"]]]
    for entry in entries:
        path = out / entry["file"]
        if not path.exists():
            raise UserError(f"{path}: missing; prepare the corpus again")
        if path.stat().st_size != entry["bytes"] or _sha256(path) != entry["sha256"]:
            raise UserError(f"{path}: does not match manifest.json (size or sha256); prepare the corpus again")
    return manifest


def read_manifest(out: Path) -> dict:
    path = out / "manifest.json"
    if not path.exists():
        hint = " (an unfinished preparation: run it again to resume)" if (out / ".work").exists() else ""
        raise UserError(f"{path}: not found; {out} is not a prepared corpus{hint}; make one with "
                        "scripts/prepare_corpus.py")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: unreadable ({str(exc)[:100]}); prepare the corpus again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UserError(f"{path}: not the manifest of a prepared corpus")
    if manifest.get("version") != VERSION:
        raise UserError(f"{path}: written by another version (format {manifest.get('version')}, this one reads "
                        f"{VERSION}); prepare the corpus again")
    return manifest
