"""Training on a prepared corpus (scripts/prepare_corpus.py): `train.py --dataset prepared --data DIR`.

Each split is its `.npy` shards seen as one 1-D id array (`ShardedIds`), memory-mapped: the batch iterator
gathers only the rows and columns of the batch it makes (a rank its own columns), so memory per rank does not
grow with the corpus, and the iterator's saved position (a row) resumes exactly, inside a shard or across
shards. Loading checks the manifest (vocab.json's sha256, every shard's size and length); the shards' sha256
are checked by `scripts/prepare_corpus.py --verify DIR` (reading every byte of a large corpus at each start
would cost minutes).
"""
import hashlib
import json
from pathlib import Path

import numpy as np

from utils.data.prepare import EOT, SPLITS, read_manifest
from utils.io.errors import UserError


class ShardedIds:
    """Read-only 1-D ids over consecutive .npy shards (memory-mapped, opened on first use).

    Supports len(), integer and slice indexing and indexing with an integer array (any shape), which is
    what data_utils.LMOrderedIterator uses (`gather`)."""

    def __init__(self, paths: list[Path], lengths: list[int], dtype):
        self.paths = list(paths)
        self.offsets = np.concatenate(([0], np.cumsum(lengths, dtype=np.int64)))
        self.dtype = np.dtype(dtype)
        self._maps: list = [None] * len(self.paths)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _shard(self, i: int) -> np.ndarray:
        if self._maps[i] is None:
            self._maps[i] = np.load(self.paths[i], mmap_mode="r")
        return self._maps[i]

    def gather(self, index) -> np.ndarray:
        index = np.asarray(index, np.int64)
        flat = index.reshape(-1)
        if len(flat) and (flat.min() < 0 or flat.max() >= len(self)):
            raise IndexError(f"index out of range for {len(self)} ids")
        shard = np.searchsorted(self.offsets, flat, side="right") - 1
        out = np.empty(len(flat), self.dtype)
        for s in np.unique(shard).tolist():
            mine = shard == s
            out[mine] = self._shard(s)[flat[mine] - self.offsets[s]]
        return out.reshape(index.shape)

    def __getitem__(self, key):
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                return self.gather(np.arange(start, stop, step))
            parts = []
            for s in range(len(self.paths)):
                lo, hi = max(start, self.offsets[s]), min(stop, self.offsets[s + 1])
                if lo < hi:
                    parts.append(np.asarray(self._shard(s)[lo - self.offsets[s]: hi - self.offsets[s]]))
            return np.concatenate(parts) if parts else np.zeros(0, self.dtype)
        if isinstance(key, (int, np.integer)):
            key = int(key) + (len(self) if key < 0 else 0)
            return self.gather(np.array([key]))[0]
        return self.gather(key)


def _check_file(path: Path, entry: dict) -> None:
    if not path.is_file():
        raise UserError(f"{path}: missing from the prepared corpus; prepare it again")
    if path.stat().st_size != entry["bytes"]:
        raise UserError(f"{path}: {path.stat().st_size} bytes, manifest.json says {entry['bytes']}; the file was "
                        "changed or truncated: prepare the corpus again")


def load_split(datadir: Path, manifest: dict, split: str) -> ShardedIds:
    info = manifest["splits"][split]
    paths, lengths = [], []
    for shard in info["shards"]:
        path = datadir / shard["file"]
        _check_file(path, shard)
        try:
            ids = np.load(path, mmap_mode="r")
        except ValueError as exc:
            raise UserError(f"{path}: not a .npy file ({str(exc)[:100]}); prepare the corpus again") from None
        if ids.shape != (shard["n_tokens"],) or ids.dtype != np.dtype(info["dtype"]):
            raise UserError(f"{path}: holds {ids.shape} {ids.dtype} ids, manifest.json says {shard['n_tokens']} "
                            f"{info['dtype']}; prepare the corpus again")
        paths.append(path)
        lengths.append(shard["n_tokens"])
    return ShardedIds(paths, lengths, info["dtype"])


def load_vocab(datadir: Path, manifest: dict):
    from utils.data.vocabulary import Vocab

    path = datadir / manifest["vocab"]["file"]
    _check_file(path, manifest["vocab"])
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != manifest["vocab"]["sha256"]:
        raise UserError(f"{path}: does not match its sha256 in manifest.json; prepare the corpus again")
    vocab = Vocab.from_dict(json.loads(data.decode("utf-8")))
    if vocab.fingerprint() != manifest["vocab"]["fingerprint"]:
        raise UserError(f"{path}: not the vocabulary the shards were written with; prepare the corpus again")
    return vocab


def check_prepared(datadir: Path, vocab_type: str = "word") -> dict:
    """What loading checks, without opening the shards' data: the manifest and the options."""
    if vocab_type != "word":
        raise UserError("--dataset prepared holds the ids of its own vocabulary; leave --vocab at word (prepare "
                        "the corpus again for another vocabulary)")
    return read_manifest(Path(datadir))


def load_prepared(datadir: Path, vocab_type: str = "word") -> tuple:
    """(vocab, {split: ShardedIds}, meta) of the prepared folder `datadir`, for a data_utils.Corpus."""
    datadir = Path(datadir)
    manifest = check_prepared(datadir, vocab_type)
    vocab = load_vocab(datadir, manifest)
    splits = {split: load_split(datadir, manifest, split) for split in SPLITS}
    return vocab, splits, {"options": {"dataset": "prepared", "vocab": "word"}, "manifest": manifest}


def prepared_split(datadir: Path, split: str, vocab) -> ShardedIds:
    """One split for eval.py, checked against the vocabulary it is scored with (the model's)."""
    from utils.data.vocabulary import check_fingerprint

    datadir = Path(datadir)
    manifest = read_manifest(datadir)
    check_fingerprint(vocab, manifest["vocab"]["fingerprint"], str(datadir),
                      "evaluate with the vocabulary the corpus was prepared with")
    return load_split(datadir, manifest, split)


def end_of_document(dataset: str, datadir, vocab=None) -> int | None:
    """--reset_mems_at_doc: the id in `vocab` of the symbol that closes each article of the corpus (`<eod>`,
    --doc_separator, or `<|endoftext|>` for --level bpe); without `vocab` only checks that there is one. One
    line when the corpus has no such symbol."""
    if dataset != "prepared":
        raise UserError(f"--reset_mems_at_doc needs articles closed by an end-of-document symbol, which --dataset "
                        f"{dataset} has not; prepare the corpus with scripts/prepare_corpus.py and train with "
                        "--dataset prepared, or drop --reset_mems_at_doc")
    options = read_manifest(Path(datadir)).get("options") or {}
    symbol = EOT if options.get("level") == "bpe" else options.get("doc_separator")
    if not symbol:
        raise UserError(f"{datadir}/manifest.json names no end-of-document symbol; prepare the corpus again or "
                        "drop --reset_mems_at_doc")
    if vocab is None:
        return None
    index = vocab.sym2idx.get(symbol) if hasattr(vocab, "sym2idx") else vocab.get_idx(symbol)
    if index is None:
        raise UserError(f"the end-of-document symbol {symbol!r} of {datadir} is not in the vocabulary; prepare the "
                        "corpus again or drop --reset_mems_at_doc")
    return index
