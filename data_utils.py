"""Corpora, the binary token cache, and batch iterators with resumable positions.

Datasets (`get_lm_corpus(datadir, dataset, vocab)`), with the reference's vocabulary rules
(reference-inventory.md §5.4), so that ids match the reference's on the same files:

| dataset | files | vocabulary counted on | special | lower | encoding |
|---|---|---|---|---|---|
| wt103 | train/valid/test.txt | train | `<eos>` | no | `<eos>` after each line |
| wt2 | train/valid/test.txt | all three | `<eos>` | no | `<eos>` after each line |
| ptb | train/valid/test.txt | all three | `<eos>` | yes | `<eos>` after each line |
| enwik8, text8 | train/valid/test.txt (symbols separated by spaces) | all three | none | yes | no line ends |
| lm1b | `1b_word_vocab.txt`, the training shards, valid.txt, test.txt | the vocabulary file | (file) | no | `<S> words <S>` per sentence |
| custom | train/valid/test.txt, words or characters (`custom_level`) | all three | `<eos>` (+ `<unk>` with min_freq/max_size) | option | `<eos>` after each line |

With `vocab='bpe'` (wt103, wt2, ptb, custom words) a byte-level BPE is trained on train.txt (or loaded with
`bpe_model`) and each split is its whole text followed by `<|endoftext|>`.

Cache: `<datadir>/.txl_cache/<dataset>-<vocab, or char for custom characters>-<hash of the options>/` (or,
where the data folder is not writable, `$TXL_CACHE_DIR` or `~/.cache/transformer-xl/data/`; or `cache_dir`), holding `meta.json` (format
version, options, the source files' sizes and modification times, token counts), `vocab.json` and one
`<split>.npy` per split (ids in the smallest unsigned dtype that fits; lm1b adds `<split>.starts.npy`, the
offset of each sentence). Splits are loaded memory-mapped, so a corpus larger than memory trains from disk.
A cache is built in a temporary folder and renamed into place (a crash never leaves half a cache), under a
file lock (concurrent ranks build it once; the others wait and load it), and rebuilt when a source file's
size or modification time changes, and rebuilt with a warning line when its files do not match the manifest in
meta.json (sizes, sha256 of vocab.json, largest ids; docs/data.md). A cache written by another format version
is an error.

Iterators yield `(data, target, seq_len, warm)`: int64 tensors `[len, bsz]` on `device` (data has up to
ext_len extra rows in front), the number of target rows, and whether the batch counts in the loss (false for
the evaluation warm-up batches). `state_dict()` / `load_state_dict()` save and restore the exact position.
"""
import contextlib
import errno
import hashlib
import io
import json
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from utils.io.atomic import atomic_open, fsync_dir, make_dir, open_nofollow, umask, write_text_atomic
from utils.io.errors import UserError
from utils.data.datasets import DATASETS
from utils.data.vocabulary import BPEVocab, Vocab, check_text_file

CACHE_FORMAT = "txl-data-cache"
CACHE_VERSION = 1
VOCAB_TYPES = ("word", "bpe")
SPLITS = ("train", "valid", "test")
LM1B_TRAIN_GLOB = "1-billion-word-language-modeling-benchmark-r13output/training-monolingual.tokenized.shuffled/news.en-*"
LM1B_VOCAB = "1b_word_vocab.txt"


@dataclass(frozen=True)
class _WordRule:
    special: tuple[str, ...]
    lower_case: bool
    counted: tuple[str, ...]  # splits whose symbols are counted for the vocabulary
    add_eos: bool
    delimiter: str | None = None
    min_freq: int = 0
    max_size: int | None = None


_RULES = {
    "wt103": _WordRule(("<eos>",), False, ("train",), True),
    "wt2": _WordRule(("<eos>",), False, SPLITS, True),
    "ptb": _WordRule(("<eos>",), True, SPLITS, True),
    "enwik8": _WordRule((), True, SPLITS, False),
    "text8": _WordRule((), True, SPLITS, False),
}


def _say(verbose: bool, message: str) -> None:
    if verbose:
        print(message, flush=True)


# --------------------------------------------------------------------------------------------------------
# Options and sources
# --------------------------------------------------------------------------------------------------------
def _resolve_options(dataset: str, vocab: str, options: dict) -> dict:
    """Check the options for `dataset` and return them normalized (they key the cache)."""
    if dataset not in DATASETS:
        raise UserError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    if vocab not in VOCAB_TYPES:
        raise UserError(f"unknown vocabulary type {vocab!r}; choose word or bpe")
    known = {"custom_level", "lower_case", "min_freq", "max_size", "bpe_model", "bpe_vocab_size"}
    unknown = set(options) - known
    if unknown:
        raise TypeError(f"unknown corpus options: {', '.join(sorted(unknown))}")
    opts = {k: v for k, v in options.items() if v is not None}
    level = opts.pop("custom_level", "word")
    if dataset != "custom":
        custom_only = sorted(k for k in ("lower_case", "min_freq", "max_size") if opts.get(k))
        if custom_only or level != "word":
            raise UserError(
                f"--{(custom_only or ['custom_level'])[0]} applies to --dataset custom only; {dataset} follows the "
                "reference's vocabulary rules"
            )
    resolved: dict[str, Any] = {"dataset": dataset, "vocab": vocab}
    if vocab == "bpe":
        if dataset in ("enwik8", "text8", "lm1b") or level != "word":
            raise UserError(f"--vocab bpe works on word-level text (wt103, wt2, ptb, custom words), not {dataset}")
        if opts.get("bpe_model"):
            resolved["bpe_model"] = str(Path(opts["bpe_model"]).resolve())
        else:
            resolved["bpe_vocab_size"] = int(opts.get("bpe_vocab_size", 32000))
        return resolved
    if dataset == "custom":
        if level not in ("word", "char"):
            raise UserError(f"--custom_level must be word or char, not {level!r}")
        resolved.update(
            custom_level=level,
            lower_case=bool(opts.get("lower_case", False)),
            min_freq=int(opts.get("min_freq", 0)),
            max_size=int(opts["max_size"]) if opts.get("max_size") else None,
        )
    return resolved


def _word_rule(opts: dict) -> _WordRule:
    if opts["dataset"] != "custom":
        return _RULES[opts["dataset"]]
    special = ("<eos>",) + (("<unk>",) if opts["min_freq"] or opts["max_size"] else ())
    delimiter = "" if opts["custom_level"] == "char" else None
    return _WordRule(special, opts["lower_case"], SPLITS, True, delimiter, opts["min_freq"], opts["max_size"])


def _source_files(datadir: Path, opts: dict) -> dict[str, Any]:
    """The files a corpus is built from: {split: path} (lm1b train: a list of shard paths), plus extras."""
    files: dict[str, Any] = {}
    if opts["dataset"] == "lm1b":
        shards = sorted(datadir.glob(LM1B_TRAIN_GLOB))
        if not shards:
            raise UserError(
                f"{datadir / LM1B_TRAIN_GLOB}: no training shards found; download One Billion Word with getdata.sh"
            )
        files["train"] = shards
        files["vocab_file"] = datadir / LM1B_VOCAB
    else:
        files["train"] = datadir / "train.txt"
    files["valid"] = datadir / "valid.txt"
    files["test"] = datadir / "test.txt"
    if opts.get("bpe_model"):
        model = Path(opts["bpe_model"])
        files["bpe_model"] = [model / "vocab.json", model / "merges.txt"] if model.is_dir() else [model]
    needs = "valid.txt, test.txt and the training shards" if opts["dataset"] == "lm1b" else "train.txt, valid.txt and test.txt"
    names = {"train": "training split", "valid": "validation split", "test": "test split",
             "vocab_file": "vocabulary file", "bpe_model": "BPE file"}
    for key, value in files.items():
        for path in value if isinstance(value, list) else [value]:
            if key in SPLITS and not path.exists():
                raise UserError(f"{path}: {names[key]} not found; a {opts['dataset']} folder needs {needs}")
            check_text_file(path, names[key])
    return files


def _flat_sources(files: dict[str, Any]) -> list[Path]:
    return [p for v in files.values() for p in (v if isinstance(v, list) else [v])]


def _describe_sources(datadir: Path, paths: list[Path]) -> list[dict]:
    out = []
    for path in paths:
        st = path.stat()
        try:
            name = str(path.resolve().relative_to(datadir.resolve()))
        except ValueError:
            name = str(path.resolve())
        out.append({"path": name, "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return out


# --------------------------------------------------------------------------------------------------------
# Cache location, lock, files
# --------------------------------------------------------------------------------------------------------
def _cache_key(opts: dict) -> str:
    """`<dataset>-<level>-<hash>`: the level is the vocabulary type (word, bpe), or char for a character-level
    custom corpus."""
    digest = hashlib.sha1(json.dumps(opts, sort_keys=True).encode()).hexdigest()[:12]
    level = "char" if opts.get("custom_level") == "char" else opts["vocab"]
    return f"{opts['dataset']}-{level}-{digest}"


def _external_root(base: Path, datadir: Path) -> Path:
    tag = hashlib.sha1(str(datadir.resolve()).encode()).hexdigest()[:8]
    return base / f"{datadir.resolve().name}-{tag}"


def _writable(path: Path) -> bool:
    while not path.exists():
        path = path.parent
    return os.access(path, os.W_OK)


def _cache_roots(datadir: Path, cache_dir: str | os.PathLike | None) -> list[Path]:
    """Candidate cache roots, preferred first: an existing cache is loaded from the first that has it, a new
    one is built in the first writable one."""
    if cache_dir is not None:
        return [_external_root(Path(cache_dir), datadir)]
    roots = [datadir / ".txl_cache"]
    env = os.environ.get("TXL_CACHE_DIR")
    base = Path(env) if env else Path.home() / ".cache" / "transformer-xl" / "data"
    roots.append(_external_root(base, datadir))
    return roots


@contextlib.contextmanager
def _build_lock(root: Path, key: str, verbose: bool):
    """Exclusive lock per cache entry, so that concurrent processes (ranks) build a cache once."""
    make_dir(root, "dataset cache folder", "--cache_dir")
    try:
        import fcntl
    except ImportError:  # no flock (Windows): the atomic rename still keeps the cache consistent
        yield
        return
    try:
        lock_file = open_nofollow(root / f".{key}.lock", "a")   # a link planted there is refused, not followed
    except OSError as exc:
        _raise_build_fault(exc, root)
        raise
    with lock_file as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _say(verbose, "Waiting for another process that is building the dataset cache...")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def id_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds ids 0 .. vocab_size - 1."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab_size <= np.iinfo(dtype).max + 1:
            return np.dtype(dtype)
    return np.dtype(np.uint64)


class _NpyWriter:
    """Append-only writer of a 1-D .npy file whose length is known only at the end, into `f` (a binary file
    from utils.io.atomic.atomic_open, opened by the caller): append(), then finish() writes the header."""

    HEADER = 128

    def __init__(self, f, dtype, high: int | None = None):
        self.f, self.dtype, self.high, self.n = f, np.dtype(dtype), high, 0
        self.max_id = -1  # the largest id written (with `high`), for the cache's manifest
        self.f.write(b"\0" * self.HEADER)

    def append(self, ids: np.ndarray) -> None:
        ids = np.ascontiguousarray(ids)
        if len(ids) and self.high is not None:
            top = int(ids.max())
            assert (ids.dtype.kind == "u" or ids.min() >= 0) and top < self.high, "ids out of range"
            self.max_id = max(self.max_id, top)
        self.f.write(ids.astype(self.dtype, copy=False).data)
        self.n += len(ids)

    def finish(self) -> int:
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(
            header, {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": (self.n,)}
        )
        assert len(header.getvalue()) == self.HEADER
        self.f.seek(0)
        self.f.write(header.getvalue())
        return self.n


def _raw_blocks(path: Path, dtype, block: int = 1 << 22) -> Iterator[np.ndarray]:
    """A raw binary file of `dtype` values, `block` values at a time (bounded memory)."""
    with open(path, "rb") as f:
        while len(ids := np.fromfile(f, dtype=dtype, count=block)):
            yield ids


# --------------------------------------------------------------------------------------------------------
# Sentence-level data (lm1b)
# --------------------------------------------------------------------------------------------------------
class SentenceData:
    """Sentences stored back to back: `tokens` (ids), `starts` (offset of each sentence, then the total),
    `shards` (index of the first sentence of each source file, then the number of sentences)."""

    def __init__(self, tokens: np.ndarray, starts: np.ndarray, shards: Sequence[int] | None = None):
        self.tokens, self.starts = tokens, starts
        n = len(starts) - 1
        self.shards = np.asarray(shards if shards is not None else [0, n], np.int64)

    @classmethod
    def from_sentences(cls, sentences: Sequence[Any]) -> "SentenceData":
        arrays = [np.asarray(s, np.int64).reshape(-1) for s in sentences]
        starts = np.concatenate(([0], np.cumsum([len(a) for a in arrays]))).astype(np.int64)
        tokens = np.concatenate(arrays) if arrays else np.zeros(0, np.int64)
        return cls(tokens, starts)

    def __len__(self) -> int:
        return len(self.starts) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        return np.asarray(self.tokens[self.starts[i] : self.starts[i + 1]])

    def n_pairs(self) -> int:
        """(input, target) pairs in all sentences: sum of max(length - 1, 0), read in blocks."""
        total = 0
        for first in range(0, len(self), 1 << 22):
            lengths = np.diff(np.asarray(self.starts[first : first + (1 << 22) + 1], np.int64))
            total += int(np.maximum(lengths - 1, 0).sum())
        return total


# --------------------------------------------------------------------------------------------------------
# Corpus
# --------------------------------------------------------------------------------------------------------
class Corpus:
    """A loaded corpus: `vocab`, and `train` / `valid` / `test` (1-D id arrays, memory-mapped; for lm1b
    SentenceData)."""

    def __init__(self, dataset: str, datadir: Path, vocab, splits: dict, cache_path: Path, meta: dict):
        self.dataset, self.datadir, self.vocab = dataset, datadir, vocab
        self.cache_path, self.meta = cache_path, meta
        self.vocab_type = meta["options"]["vocab"]
        self.train, self.valid, self.test = splits["train"], splits["valid"], splits["test"]

    def get_iterator(
        self,
        split: str,
        bsz: int,
        bptt: int,
        device: str | torch.device = "cpu",
        ext_len: int = 0,
        mem_len: int | None = None,
        warmup: bool = True,
        rank: int = 0,
        world_size: int = 1,
        varlen: bool = False,
        seed: int = 0,
        shuffle: bool | None = None,
    ):
        if split not in SPLITS:
            raise UserError(f"unknown split {split!r}; choose train, valid or test")
        data = getattr(self, split)
        if isinstance(data, SentenceData):
            return LMShuffledIterator(
                data, bsz, bptt, device=device, ext_len=ext_len, shuffle=(split == "train") if shuffle is None else shuffle,
                seed=seed, rank=rank, world_size=world_size,
            )
        return LMOrderedIterator(
            data, bsz, bptt, device=device, mem_len=mem_len, ext_len=ext_len, warmup=warmup, rank=rank,
            world_size=world_size, varlen=varlen, seed=seed,
        )


def data_folder(datadir: str | os.PathLike) -> Path:
    """The corpus folder, or the one-line error that says how to get it."""
    datadir = Path(datadir)
    if not datadir.is_dir():
        raise UserError(f"{datadir}: data folder not found; download the dataset with getdata.sh or pass --data")
    return datadir


def check_corpus(datadir: str | os.PathLike, dataset: str, vocab: str = "word", **options) -> None:
    """What get_lm_corpus checks before it reads anything (the folder, the options, the source files), without
    reading or building the corpus: train.py --check."""
    if dataset == "prepared":  # a folder written by scripts/prepare_corpus.py
        from utils.data.prepared import check_prepared
        check_prepared(data_folder(datadir), vocab)
        return
    _source_files(data_folder(datadir), _resolve_options(dataset, vocab, options))


def get_lm_corpus(
    datadir: str | os.PathLike,
    dataset: str,
    vocab: str = "word",
    *,
    cache_dir: str | os.PathLike | None = None,
    verbose: bool = True,
    progress: bool = True,
    **options,
) -> Corpus:
    """Load the corpus of `datadir` from its cache, building the cache first when needed.

    options: custom_level ('word' | 'char'), lower_case, min_freq, max_size (custom only); bpe_model (a
    tokenizer.json or a folder with vocab.json + merges.txt), bpe_vocab_size (BPE trained on train.txt).
    """
    datadir = data_folder(datadir)
    if dataset == "prepared":  # a folder written by scripts/prepare_corpus.py: shards, no cache
        from utils.data.prepared import load_prepared
        vocab, splits, meta = load_prepared(datadir, vocab)
        return Corpus("prepared", datadir, vocab, splits, datadir, meta)
    opts = _resolve_options(dataset, vocab, options)
    files = _source_files(datadir, opts)
    sources = _describe_sources(datadir, _flat_sources(files))
    key = _cache_key(opts)
    roots = _cache_roots(datadir, cache_dir)
    for root in roots:
        corpus = _load_checked(datadir, root / key, opts, sources, verbose)
        if corpus is not None:
            return corpus
    root = next((r for r in roots if _writable(r)), None)
    if root is None:
        raise UserError(f"no writable folder for the dataset cache (tried {', '.join(map(str, roots))}); pass --cache_dir")
    with _build_lock(root, key, verbose):
        corpus = _load_checked(datadir, root / key, opts, sources, verbose, quiet=True)  # another process's build
        if corpus is None:
            _say(verbose, f"Producing dataset {dataset}...")
            vocab, meta = _build(datadir, root, key, opts, files, sources, verbose, progress)
            corpus = _load(datadir, root / key, meta, built=vocab if isinstance(vocab, Vocab) else None)
    return corpus


def encode_split(datadir: str | os.PathLike, dataset: str, split: str, vocab) -> "np.ndarray | SentenceData":
    """One split of `datadir` encoded with a given vocabulary (e.g. the one stored in a checkpoint), by the
    dataset's rules, without building the corpus cache: eval.py scores a split with the ids the model knows.

    Returns 1-D int64 ids, or SentenceData for lm1b (sentences between <S> markers)."""
    if dataset not in DATASETS:
        raise UserError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; choose train, valid or test")
    datadir = data_folder(datadir)
    if dataset == "prepared":
        from utils.data.prepared import prepared_split
        return prepared_split(datadir, split, vocab)
    path = datadir / f"{split}.txt"
    if not path.exists():
        raise UserError(f"{path}: {split} split not found; a {dataset} folder needs train.txt, valid.txt and test.txt")
    check_text_file(path, f"{split} split")
    if dataset == "lm1b":
        return SentenceData.from_sentences(vocab.encode_file(path, ordered=False, add_eos=False, add_double_eos=True))
    if isinstance(vocab, BPEVocab):  # the whole file then <|endoftext|>, as in the cache
        return vocab.encode_file(path)
    add_eos = _RULES[dataset].add_eos if dataset in _RULES else True
    return vocab.encode_file(path, ordered=True, add_eos=add_eos)


class _Damaged(Exception):
    """A cache whose files do not match its manifest (or cannot be parsed): rebuilt with a warning."""


def _read_meta(path: Path) -> dict:
    meta_file = path / "meta.json"
    try:
        text = meta_file.read_text(encoding="utf-8")
    except OSError as exc:
        raise UserError(f"{meta_file}: unreadable dataset cache ({exc.strerror}); make it readable, or pass "
                        "another --cache_dir") from None
    try:
        meta = json.loads(text)
        if not isinstance(meta, dict) or meta.get("format") != CACHE_FORMAT:
            raise ValueError("not a data cache")
    except ValueError as exc:
        raise _Damaged(f"meta.json: {str(exc)[:200]}") from None
    if meta.get("version") != CACHE_VERSION:
        raise UserError(
            f"{meta_file}: dataset cache written by another version (cache format {meta.get('version')}, this "
            f"version reads {CACHE_VERSION}); delete {path} to rebuild it"
        )
    return meta


def _valid_meta(path: Path, opts: dict, sources: list[dict], verbose: bool) -> dict | None:
    """The cache's metadata if `path` holds a cache of these options built from these files; None when it is
    missing or stale (a source file changed)."""
    if not (path / "meta.json").exists():
        return None
    meta = _read_meta(path)
    if meta.get("options") != opts:
        raise UserError(f"{path / 'meta.json'}: cache of other options than its name says; delete {path}")
    if meta.get("sources") != sources:
        old = {s["path"]: s for s in meta.get("sources", [])}
        changed = next((s["path"] for s in sources if old.get(s["path"]) != s), "the list of files")
        _say(verbose, f"Source files changed since the dataset cache was built ({changed}); rebuilding it")
        return None
    return meta


def _load_checked(datadir: Path, path: Path, opts: dict, sources: list[dict], verbose: bool,
                  quiet: bool = False) -> Corpus | None:
    """The corpus cached at `path`; None when there is none, it is stale, or it is damaged (then a warning line
    on stderr says so, and the caller rebuilds it)."""
    try:
        meta = _valid_meta(path, opts, sources, verbose and not quiet)
        if meta is None:
            return None
        corpus = _load(datadir, path, meta)
    except _Damaged as exc:
        if not quiet:
            print(f"warning: dataset cache {path} is damaged ({exc}); rebuilding it", file=sys.stderr, flush=True)
        return None
    if not quiet:
        _say(verbose, "Loading cached dataset...")
    return corpus


# The manifest (meta.json's "manifest") catches a damaged cache at load, before a run indexes an embedding
# with a wrong id: every file's size in bytes (a truncated or extended file), the sha256 of the small
# vocab.json, and each token file's largest id, compared with the file's (and required to be below the
# vocabulary size). Hashing the token files would cost seconds per load for a 500 MB corpus (sha256 reads
# ~1 GB/s); their maximum is a numpy reduction over the memory map at memory speed, and every id that could
# break training (one past the vocabulary) is found by it. A changed id within the vocabulary's range is not
# detected: that would need the hash.
def _manifest(path: Path, splits: dict, vocab_json: bytes, max_ids: dict) -> dict:
    """The manifest of the files just written in `path`: vocab.json's bytes are `vocab_json`, and `max_ids` the
    largest id of each token file as its writer saw it."""
    manifest = {"vocab.json": {"bytes": len(vocab_json), "sha256": hashlib.sha256(vocab_json).hexdigest()}}
    for info in splits.values():
        manifest[info["file"]] = {"bytes": (path / info["file"]).stat().st_size, "max_id": max_ids[info["file"]]}
        if "starts" in info:
            manifest[info["starts"]] = {"bytes": (path / info["starts"]).stat().st_size}
    return manifest


def _check_manifest(path: Path, meta: dict) -> None:
    manifest = meta.get("manifest")
    if not isinstance(manifest, dict):
        raise _Damaged("meta.json has no manifest of the cache's files")
    for name, entry in manifest.items():
        try:
            size = (path / name).stat().st_size
        except FileNotFoundError:
            raise _Damaged(f"{name} is missing") from None
        if size != entry.get("bytes"):
            raise _Damaged(f"{name} has {size} bytes, the manifest says {entry.get('bytes')}")
    vocab_file = path / "vocab.json"
    if hashlib.sha256(vocab_file.read_bytes()).hexdigest() != manifest.get("vocab.json", {}).get("sha256"):
        raise _Damaged("vocab.json does not match its sha256 in the manifest")


def _load(datadir: Path, path: Path, meta: dict, built=None) -> Corpus:
    """The corpus cached at `path`, its files checked against the manifest; `built`: the vocabulary that this
    process has just written there with `meta` (the files it wrote are opened, and not checked again: the
    checks are for a cache that changed since it was written)."""
    check = built is None
    try:
        if check:
            _check_manifest(path, meta)
            vocab = Vocab.from_dict(json.loads((path / "vocab.json").read_text(encoding="utf-8")))
            stored = meta.get("vocab_fingerprint")      # the vocabulary the ids were written with
            if stored is not None and vocab.fingerprint() != stored:
                raise _Damaged("vocab.json is not the vocabulary the ids were written with")
        else:
            vocab = built
        splits = {}
        for split, info in meta["splits"].items():
            tokens = _load_ids(path / info["file"], info["n_tokens"])
            high = (int(tokens.max()) if len(tokens) else -1) if check else meta["manifest"][info["file"]]["max_id"]
            if high >= len(vocab) or high != meta["manifest"][info["file"]].get("max_id"):
                raise _Damaged(f"{info['file']} holds id {high}, the manifest says "
                               f"{meta['manifest'][info['file']].get('max_id')} and the vocabulary has {len(vocab)}")
            if "starts" in info:
                starts = _load_ids(path / info["starts"], info["n_sentences"] + 1)
                if check and (starts[0] != 0 or starts[-1] != len(tokens) or np.any(np.diff(starts) < 0)):
                    raise _Damaged(f"{info['starts']} holds sentence offsets out of order or range")
                splits[split] = SentenceData(tokens, starts, info["shards"])
            else:
                splits[split] = tokens
    except OSError as exc:
        raise UserError(f"{path}: unreadable dataset cache ({exc}); make it readable, or pass another "
                        "--cache_dir") from None
    except (ValueError, KeyError, TypeError, UserError) as exc:   # damaged JSON, a vocabulary that does not parse
        raise _Damaged(str(exc)[:200]) from None
    return Corpus(meta["options"]["dataset"], datadir, vocab, splits, path, meta)


def _load_ids(file: Path, length: int) -> np.ndarray:
    try:
        ids = np.load(file, mmap_mode="r")
    except ValueError as exc:
        raise _Damaged(f"{file.name}: {str(exc)[:200]}") from None
    if ids.ndim != 1 or len(ids) != length:
        raise _Damaged(f"{file.name} has {ids.shape} ids, meta.json says {length}")
    return ids


def _build(datadir, root, key, opts, files, sources, verbose, progress) -> tuple[Any, dict]:
    """Build the cache in a temporary folder and rename it into place; nothing is left behind on failure.
    Returns the vocabulary (without its counts, as vocab.json has it) and meta.json's content."""
    started = time.perf_counter()
    for stale in root.glob(f".{key}.tmp-*"):  # left by a build that was killed (we hold the build lock)
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=root))
    os.chmod(tmp, 0o777 & ~umask())  # mkdtemp's 0o700 would hide a shared data folder's cache from the team
    try:
        if opts["dataset"] == "lm1b":
            vocab, splits = _build_lm1b(tmp, files, verbose, progress)
        elif opts["vocab"] == "bpe":
            vocab, splits = _build_bpe(tmp, files, opts, verbose, progress)
        else:
            vocab, splits = _build_words(tmp, files, _word_rule(opts), verbose, progress)
        for split, info in splits.items():
            if info["n_tokens"] == 0:
                raise UserError(f"{_first(files[split])}: {split} split has no tokens")
        max_ids = {info["file"]: info.pop("max_id") for info in splits.values()}
        vocab_json = json.dumps(vocab.to_dict(), ensure_ascii=False).encode("utf-8")
        with atomic_open(tmp / "vocab.json", "wb", sync_dir=False) as f:
            f.write(vocab_json)
        meta = {
            "format": CACHE_FORMAT,
            "version": CACHE_VERSION,
            "options": opts,
            "sources": sources,
            "splits": splits,
            "vocab_size": len(vocab),
            "vocab_fingerprint": vocab.fingerprint(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "manifest": _manifest(tmp, splits, vocab_json, max_ids),
        }
        meta_json = json.dumps(meta, indent=1)
        write_text_atomic(tmp / "meta.json", meta_json, sync_dir=False)
        fsync_dir(tmp)  # the folder's entries, once (each file was fsynced as it was written, sync_dir=False)
        final = root / key
        if final.exists():  # stale: move it away first, so that the rename below is atomic
            old = Path(tempfile.mkdtemp(prefix=f".{key}.old-", dir=root))
            os.replace(final, old / "cache")
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, final)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            _raise_build_fault(exc, root)
        raise
    fsync_dir(root)  # the rename is on disk (the files in the folder were fsynced as they were written)
    _say(verbose, f"Dataset cache written to {root / key} in {time.perf_counter() - started:.1f}s")
    if isinstance(vocab, Vocab):
        vocab.drop_counts()
    return vocab, json.loads(meta_json)  # (meta as a later load reads it: JSON types)


def _raise_build_fault(exc: OSError, root: Path) -> None:
    """A full disk or a file the user may not read while the cache is built: one line, not a traceback (the
    writes through utils.io.atomic already say so themselves; these are the plain reads and scratch files)."""
    if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        raise UserError(f"cannot write the dataset cache in {root}: {os.strerror(exc.errno).lower()}; free space "
                        "there or pass another --cache_dir") from None
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        where = exc.filename or root
        raise UserError(f"cannot {'write' if str(where).startswith(str(root)) else 'read'} {where}: "
                        f"{os.strerror(exc.errno).lower()}; fix its permissions or pass another --data / "
                        "--cache_dir") from None


def _first(value):
    return value[0] if isinstance(value, list) else value


def _build_words(tmp: Path, files: dict, rule: _WordRule, verbose: bool, progress: bool):
    vocab = Vocab(rule.special, rule.min_freq, rule.max_size, lower_case=rule.lower_case, delimiter=rule.delimiter)
    for split in rule.counted:  # one read: provisional ids are kept and remapped once the vocabulary exists
        with open(tmp / f"{split}.prov", "wb") as f:
            vocab.count_file(files[split], sink=lambda ids, f=f: f.write(ids.astype(np.int32).tobytes()), progress=progress)
    vocab.build_vocab(verbose=verbose)
    dtype = id_dtype(len(vocab))
    splits = {}
    for split in SPLITS:
        if split in rule.counted:
            prov = tmp / f"{split}.prov"
            blocks = vocab.finish_provisional(_raw_blocks(prov, np.int32), files[split], add_eos=rule.add_eos,
                                              starts=False, dtype=dtype)
        else:
            blocks = vocab.encode_chunks(files[split], add_eos=rule.add_eos, progress=progress)
        splits[split] = _write_split(tmp, split, blocks, dtype, len(vocab))
        if split in rule.counted:
            os.remove(prov)
    return vocab, splits


def _write_split(tmp: Path, split: str, blocks, dtype, n_vocab: int) -> dict:
    with atomic_open(tmp / f"{split}.npy", "wb", sync_dir=False) as f:  # (_build fsyncs the folder)
        writer = _NpyWriter(f, dtype, high=n_vocab)
        for ids, _ in blocks:
            writer.append(ids)
        n = writer.finish()
    return {"file": f"{split}.npy", "dtype": np.dtype(dtype).name, "n_tokens": n, "max_id": writer.max_id}


def _build_bpe(tmp: Path, files: dict, opts: dict, verbose: bool, progress: bool):
    if opts.get("bpe_model"):
        _say(verbose, f"loading BPE tokenizer {opts['bpe_model']}")
        vocab = BPEVocab.load(opts["bpe_model"])
    else:
        _say(verbose, f"training a byte-level BPE of {opts['bpe_vocab_size']} tokens on {files['train']}")
        vocab = BPEVocab.train([files["train"]], vocab_size=opts["bpe_vocab_size"], progress=progress)
    dtype = id_dtype(len(vocab))
    splits = {s: _write_split(tmp, s, vocab.encode_chunks(files[s], progress=progress), dtype, len(vocab)) for s in SPLITS}
    return vocab, splits


def _build_lm1b(tmp: Path, files: dict, verbose: bool, progress: bool):
    vocab = Vocab(special=(), lower_case=False, vocab_file=files["vocab_file"])
    vocab.build_vocab(verbose=verbose)
    dtype = id_dtype(len(vocab))
    splits = {}
    for split in SPLITS:
        paths = files[split] if isinstance(files[split], list) else [files[split]]
        shards = []
        with (atomic_open(tmp / f"{split}.npy", "wb", sync_dir=False) as f_tokens,
              atomic_open(tmp / f"{split}.starts.npy", "wb", sync_dir=False) as f_starts):
            tokens = _NpyWriter(f_tokens, dtype, high=len(vocab))
            starts = _NpyWriter(f_starts, np.int64)
            for i, path in enumerate(paths):
                if verbose and len(paths) > 1:
                    print(f"encoding {split} shard {i + 1}/{len(paths)}: {path.name}", flush=True)
                shards.append(starts.n)
                for ids, line_starts in vocab.encode_chunks(path, add_eos=False, add_double_eos=True, progress=progress):
                    starts.append(line_starts + tokens.n)
                    tokens.append(ids)
            shards.append(starts.n)
            starts.append(np.array([tokens.n]))
            n_tokens, n_starts = tokens.finish(), starts.finish()
        splits[split] = {
            "file": f"{split}.npy",
            "dtype": dtype.name,
            "n_tokens": n_tokens,
            "starts": f"{split}.starts.npy",
            "n_sentences": n_starts - 1,
            "shards": shards,
            "max_id": tokens.max_id,
        }
    return vocab, splits


# --------------------------------------------------------------------------------------------------------
# Iterators
# --------------------------------------------------------------------------------------------------------
def _as_ids(data) -> np.ndarray:
    if hasattr(data, "gather"):  # utils.data.prepared.ShardedIds: shards read memory-mapped, kept as they are
        return data
    if isinstance(data, torch.Tensor):
        return data.detach().cpu().reshape(-1).numpy()
    if isinstance(data, np.ndarray):
        return data.reshape(-1)
    return np.asarray(data, np.int64).reshape(-1)


def rank_columns(bsz: int, rank: int, world_size: int) -> tuple[int, int]:
    """The global batch columns [first, last) of `rank`: `torch.chunk(batch, world_size, dim=1)[rank]`."""
    if not 0 <= rank < world_size:
        raise UserError(f"rank {rank} is outside the world size {world_size}")
    size = -(-bsz // world_size)
    first, last = rank * size, min((rank + 1) * size, bsz)
    if first >= last:
        raise UserError(f"a batch of {bsz} columns leaves rank {rank} of {world_size} nothing; use a larger batch")
    return first, last


def _check_sizes(bsz: int, bptt: int) -> None:
    if bsz < 1 or bptt < 1:
        raise UserError(f"batch size ({bsz}) and segment length ({bptt}) must be positive")


def _check_state(state: dict, expected: dict) -> None:
    """A saved iterator position fits this iterator only when these fields agree."""
    for key, value in expected.items():
        if state.get(key) != value:
            raise UserError(
                f"cannot resume the data stream: it was saved with {key}={state.get(key)}, this run has {value} "
                "(resume with the same data, global batch size and segment length)"
            )


def _check_position(state: dict, **upper: int | None) -> None:
    """A saved position lies inside the stream: each named field an integer in [0, its upper bound] (None: no
    upper bound), so a damaged checkpoint cannot resume past the end or before the start."""
    for name, bound in upper.items():
        value = state.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0 or (bound is not None and value > bound):
            limit = f"0..{bound}" if bound is not None else ">= 0"
            raise UserError(f"cannot resume the data stream: its saved {name} is {value!r}, outside this stream "
                            f"({limit})")


def _to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.int64))
    if device.type == "cpu":
        return tensor
    if device.type == "cuda":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


class LMOrderedIterator:
    """Batches of a token stream cut into `bsz` parallel streams (the reference's ordered iterator).

    The data (1-D ids: numpy array, memmap or tensor) is trimmed to `n_step = len // bsz` tokens per stream;
    column b of the [rows, bsz] layout is the contiguous stream b. Batch i covers rows [i, i + seq_len) for
    the input (plus up to ext_len earlier rows) and rows shifted by one for the target.

    Evaluation warm-up (mem_len given and warmup true): `ceil(mem_len / bptt) * bptt` rows are put in front,
    each stream preceded by the end of the previous stream (stream 0 by the end of the corpus); batches in
    those rows have warm=False, so every real token is scored once, with a full memory.

    Distributed: a rank yields only its columns of the global batch (`rank_columns`).

    roll(seed, epoch) rotates each stream by an amount drawn from `torch.Generator().manual_seed(seed +
    epoch)` (the reference's draws, for the global columns), always starting from the unrolled data, so the
    arrangement depends on (seed, epoch) alone. Rows are gathered lazily, so memory-mapped data stays on disk.

    Iterating starts at row 0, or where `load_state_dict` put it; `state_dict()` at any time gives the
    position of the next batch. `get_fixlen_iter(start)` keeps the reference's meaning of start (the
    `last_iter` of a previous run: the next batch starts at start + bptt).
    """

    def __init__(
        self,
        data,
        bsz: int,
        bptt: int,
        device: str | torch.device = "cpu",
        mem_len: int | None = None,
        ext_len: int | None = None,
        warmup: bool = True,
        rank: int = 0,
        world_size: int = 1,
        varlen: bool = False,
        seed: int = 0,
    ):
        _check_sizes(bsz, bptt)
        self.src = _as_ids(data)
        self.bsz, self.bptt = bsz, bptt
        self.ext_len = ext_len or 0
        self.mem_len, self.warmup = mem_len, warmup
        self.device = torch.device(device)
        self.n_step = len(self.src) // bsz
        if self.n_step < 2:
            raise UserError(
                f"{len(self.src)} tokens are too few for a batch of {bsz} streams (each needs at least 2 tokens)"
            )
        if mem_len and warmup:
            self.warmup_batches = -(-mem_len // bptt)
            self.warmup_elems = self.warmup_batches * bptt
        else:
            self.warmup_batches = self.warmup_elems = 0
        self.n_rows = self.warmup_elems + self.n_step
        self.col_first, self.col_last = rank_columns(bsz, rank, world_size)
        self.cols = np.arange(self.col_first, self.col_last)
        self.n_batch = -(-self.n_rows // bptt)
        self.varlen, self.seed, self.epoch = varlen, seed, 0
        self.roll_key: tuple[int, int] | None = None
        self.shifts: np.ndarray | None = None
        self.last_iter: int | None = None
        self.pos = self.batch = 0
        self._resume: tuple[int, int] | None = None

    # ---- rows ----------------------------------------------------------------------------------------------
    def _rows(self, first: int, last: int) -> np.ndarray:
        """Rows [first, last) of the (warm-up, rolled) layout, local columns: int64 [last - first, ncols]."""
        W, n = self.warmup_elems, self.n_step
        if self.shifts is None and W == 0 and isinstance(self.src, np.ndarray):
            grid = self.src[: n * self.bsz].reshape(self.bsz, n)
            return np.asarray(grid[self.col_first : self.col_last, first:last]).T.astype(np.int64)
        r = np.arange(first, last)[:, None]
        c = self.cols[None, :]
        if self.shifts is not None:
            r = (r + self.shifts[c]) % self.n_rows
        if W:
            in_warmup = r < W
            row = np.where(in_warmup, (r - W) % n, r - W)
            col = np.where(in_warmup, (c - 1) % self.bsz, c)
        else:
            row, col = r, c
        return np.asarray(self.src[col * n + row]).astype(np.int64)

    def get_batch(self, i: int, bptt: int | None = None):
        seq_len = min(bptt or self.bptt, self.n_rows - 1 - i)
        if seq_len < 1:
            raise IndexError(f"no batch starts at row {i} of {self.n_rows}")
        first = max(0, i - self.ext_len)
        rows = self._rows(first, i + seq_len + 1)
        data = _to_device(rows[: i + seq_len - first], self.device)
        target = _to_device(rows[i + 1 - first :], self.device)
        warm = i >= self.warmup_elems
        return data, target, seq_len, warm

    # ---- passes ----------------------------------------------------------------------------------------------
    def _begin(self, start: int | None) -> None:
        if start is not None:
            self.pos = start + self.bptt if start else 0
            self.batch = -(-self.pos // self.bptt)
        elif self._resume is not None:
            self.pos, self.batch = self._resume
        else:
            self.pos = self.batch = 0
        self._resume = None

    def _end(self) -> None:
        self.pos = self.batch = 0
        self.epoch += 1

    def _pass(self, start: int | None, length=None):
        """One pass from the start position; `length(batch_number)` gives variable segment lengths."""
        self._begin(start)
        while self.pos < self.n_rows - 1:
            i = self.pos
            batch = self.get_batch(i, length(self.batch) if length else None)
            self.last_iter, self.pos, self.batch = i, i + batch[2], self.batch + 1
            yield batch
        self._end()

    def get_fixlen_iter(self, start: int | None = None):
        return self._pass(start)

    def varlen_bptt(self, batch: int, std: float = 5, min_len: int = 5, max_deviation: int = 3) -> int:
        """Length of batch number `batch` of this epoch: the reference's rule (bptt, or bptt / 2 with
        probability 0.05, plus N(0, std) noise, clipped to [min_len, bptt + max_deviation * std]) drawn from a
        generator seeded with (seed, epoch, batch), so that it can be recomputed after a restart."""
        rng = np.random.default_rng([self.seed, self.epoch, batch])
        mean = self.bptt if rng.random() < 0.95 else self.bptt / 2.0
        return int(min(self.bptt + max_deviation * std, max(min_len, int(rng.normal(mean, std)))))

    def get_varlen_iter(self, start: int | None = None, std: float = 5, min_len: int = 5, max_deviation: int = 3):
        return self._pass(start, lambda batch: self.varlen_bptt(batch, std, min_len, max_deviation))

    def __iter__(self):
        return self.get_varlen_iter() if self.varlen else self.get_fixlen_iter()

    # ---- epochs and positions --------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """The epoch number that seeds variable lengths (it also advances by one after each full pass)."""
        self.epoch = epoch

    def roll(self, seed: int, epoch: int = 0) -> None:
        """Rotate every stream by a random amount drawn from (seed, epoch); see the class docstring."""
        generator = torch.Generator()
        generator.manual_seed(seed + epoch)
        self.shifts = np.array(
            [int(torch.randint(0, self.n_rows, (1,), generator=generator)) for _ in range(self.bsz)], np.int64
        )
        self.roll_key = (seed, epoch)
        self.epoch = epoch

    def unroll(self) -> None:
        self.shifts, self.roll_key = None, None

    def state_dict(self) -> dict:
        pos, batch = self._resume if self._resume is not None else (self.pos, self.batch)
        return {
            "type": "ordered",
            "pos": pos,
            "batch": batch,
            "last_iter": self.last_iter,
            "epoch": self.epoch,
            "seed": self.seed,
            "roll": list(self.roll_key) if self.roll_key else None,
            "n_tokens": len(self.src),
            "bsz": self.bsz,
            "bptt": self.bptt,
            "warmup_elems": self.warmup_elems,
            "varlen": self.varlen,
        }

    def load_state_dict(self, state: dict) -> None:
        expected = {"type": "ordered", "n_tokens": len(self.src), "bsz": self.bsz, "warmup_elems": self.warmup_elems}
        _check_state(state, expected)
        if state["roll"]:
            self.roll(*state["roll"])
        else:
            self.unroll()
        _check_position(state, pos=self.n_rows, batch=self.n_batch)
        self.seed, self.epoch, self.last_iter = state["seed"], state["epoch"], state["last_iter"]
        self._resume = (int(state["pos"]), int(state["batch"]))


class LMShuffledIterator:
    """Batches of sentences packed into `bsz` streams (the reference's shuffled iterator, used for lm1b).

    Each stream takes the next sentence of the sentence order whenever its current one is used up, so
    sentences are cut across batches; a batch ends when every stream has bptt (input, target) pairs, and the
    last incomplete batch is dropped. With shuffle, the order is a permutation of the shards (source files)
    and, inside each, of the sentences, drawn from (seed, epoch). Ranks simulate the global batch and keep
    their columns. ext_len keeps the last ext_len input rows in front of the next batch. All batches are warm.
    The position (sentence cursor, each stream's place, retained rows) is saved by state_dict().
    """

    def __init__(
        self,
        data,
        bsz: int,
        bptt: int,
        device: str | torch.device = "cpu",
        ext_len: int | None = None,
        shuffle: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        mem_len: int | None = None,  # accepted for the same call as LMOrderedIterator; no warm-up here
        warmup: bool = True,
    ):
        _check_sizes(bsz, bptt)
        self.data = data if isinstance(data, SentenceData) else SentenceData.from_sentences(data)
        self.bsz, self.bptt = bsz, bptt
        self.ext_len = ext_len or 0
        self.device = torch.device(device)
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0
        self.col_first, self.col_last = rank_columns(bsz, rank, world_size)
        self.rank, self.world_size = rank, world_size
        pairs = self.data.n_pairs()
        self.n_batch = pairs // (bsz * bptt)  # an upper bound: streams may run dry a little earlier
        if self.n_batch == 0:
            raise UserError(f"{pairs} token pairs are too few for one batch of {bsz} x {bptt}")
        self.last_iter: int | None = None
        self._reset()
        self._resume: dict | None = None

    def _reset(self) -> None:
        self.batch = 0
        self._cursor = 0
        self._streams: list[list[int] | None] = [None] * self.bsz
        self._retain: np.ndarray | None = None

    def _order(self, cursor: int) -> Iterator[int]:
        """Sentence ids of this epoch's order, from position `cursor` on."""
        shards = self.data.shards
        n_shards = len(shards) - 1
        shard_order = np.random.default_rng([self.seed, self.epoch]).permutation(n_shards) if self.shuffle else range(n_shards)
        for s in shard_order:
            first, last = int(shards[s]), int(shards[s + 1])
            if cursor >= last - first:
                cursor -= last - first
                continue
            if self.shuffle:
                ids = np.random.default_rng([self.seed, self.epoch, int(s)]).permutation(last - first) + first
            else:
                ids = np.arange(first, last)
            yield from ids[cursor:].tolist()
            cursor = 0

    def _next_batch(self, sentences: Iterator[int]):
        """Fill the next batch (reference semantics); raises StopIteration when the sentences run out."""
        starts, tokens, bptt = self.data.starts, self.data.tokens, self.bptt
        n_retain = 0 if self._retain is None else len(self._retain)
        ncols = self.col_last - self.col_first
        data = np.full((n_retain + bptt, ncols), -1, np.int64)
        target = np.full((bptt, ncols), -1, np.int64)
        if n_retain:
            data[:n_retain] = self._retain
        streams = list(self._streams)
        for g in range(self.bsz):
            local = g - self.col_first if self.col_first <= g < self.col_last else -1
            filled = 0
            stream = streams[g]
            while filled < bptt:
                if stream is None or stream[2] - stream[1] <= 1:
                    sid = next(sentences)
                    self._cursor += 1
                    stream = [sid, 0, int(starts[sid + 1] - starts[sid])]
                sid, off, length = stream
                n_new = min(length - off - 1, bptt - filled)
                if local >= 0 and n_new > 0:
                    begin = int(starts[sid]) + off
                    seg = np.asarray(tokens[begin : begin + n_new + 1])
                    data[n_retain + filled : n_retain + filled + n_new, local] = seg[:-1]
                    target[filled : filled + n_new, local] = seg[1:]
                stream = [sid, off + n_new, length]
                filled += n_new
            streams[g] = stream
        self._streams = streams
        keep = min(len(data), self.ext_len)
        self._retain = data[len(data) - keep :].copy() if keep else None
        return data, target

    def get_fixlen_iter(self, start: int | None = None):
        """A pass over the sentences; start (optional) is the index of the last batch already used."""
        if self._resume is not None and start is None:
            self._load_position(self._resume)
        else:
            self._reset()
        self._resume = None
        sentences = self._order(self._cursor)
        try:
            if start is not None:
                for _ in range(start + 1):
                    self._next_batch(sentences)
                    self.batch += 1
            while True:
                data, target = self._next_batch(sentences)
                self.last_iter = self.batch
                self.batch += 1
                yield _to_device(data, self.device), _to_device(target, self.device), self.bptt, True
        except StopIteration:
            pass
        self._reset()
        self.epoch += 1

    __iter__ = get_fixlen_iter

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def roll(self, seed: int, epoch: int = 0) -> None:
        """For the same call as LMOrderedIterator: a new shuffle order from (seed, epoch)."""
        self.seed, self.epoch = seed, epoch

    def state_dict(self) -> dict:
        if self._resume is not None:
            return dict(self._resume)
        return {
            "type": "shuffled",
            "batch": self.batch,
            "cursor": self._cursor,
            "streams": [list(s) if s is not None else None for s in self._streams],
            "retain": self._retain.tolist() if self._retain is not None else None,
            "last_iter": self.last_iter,
            "epoch": self.epoch,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "n_sentences": len(self.data),
            "bsz": self.bsz,
            "bptt": self.bptt,
            "columns": [self.col_first, self.col_last],
        }

    def load_state_dict(self, state: dict) -> None:
        expected = {"type": "shuffled", "n_sentences": len(self.data), "bsz": self.bsz, "bptt": self.bptt}
        if state.get("retain") is not None:
            expected["columns"] = [self.col_first, self.col_last]
        _check_state(state, expected)
        _check_position(state, cursor=len(self.data), batch=None)
        self.seed, self.epoch, self.shuffle = state["seed"], state["epoch"], state["shuffle"]
        self.last_iter = state["last_iter"]
        self._resume = dict(state)

    def _load_position(self, state: dict) -> None:
        self.batch, self._cursor = int(state["batch"]), int(state["cursor"])
        self._streams = [list(s) if s is not None else None for s in state["streams"]]
        self._retain = np.asarray(state["retain"], np.int64) if state["retain"] is not None else None


# --------------------------------------------------------------------------------------------------------
# Raw text (eval.py --manual)
# --------------------------------------------------------------------------------------------------------
def tokenize_raw(text: str, lang: str = "en") -> str:
    """Tokenize raw text the way WikiText is tokenized (Moses, then @.@ / @,@ / @-@ inside numbers/words)."""
    import sacremoses

    text = sacremoses.MosesTokenizer(lang).tokenize(text, return_str=True)
    text = text.replace("&quot;", '"').replace("&apos;", "'")
    text = re.sub(r"(\d)\.(\d)", r"\1 @.@ \2", text)
    text = re.sub(r"(\d),(\d)", r"\1 @,@ \2", text)
    text = re.sub(r"(\w)-(\w)", r"\1 @-@ \2", text)
    return text
