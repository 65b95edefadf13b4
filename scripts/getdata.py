#!/usr/bin/env python3
"""Download the language-modelling datasets into data/<name>/ with the standard file names.

    getdata.sh [--data DIR] [--mirror URL] [wt2 wt103 ptb enwik8 text8 lm1b ...]

| dataset | folder | files |
|---|---|---|
| wt2, wt103 | wikitext-2/, wikitext-103/ | train.txt valid.txt test.txt (WikiText v1, tokenized) |
| ptb | ptb/ (and pennchar/, characters) | train.txt valid.txt test.txt (Mikolov's preprocessing) |
| enwik8 | enwik8/ | train/valid/test.txt: the first 90M / next 5M / last 5M bytes as byte ids separated by spaces, one line per line of the original (+ .raw with the bytes) |
| text8 | text8/ | train/valid/test.txt: all but the last 10M / next 5M / last 5M characters, spaces shown as `_`, characters separated by spaces (+ .raw) |
| lm1b | one-billion-words/ | the extracted benchmark tree, 1b_word_vocab.txt, valid.txt (heldout shard 1) and test.txt (heldout shard 0, the usual test set) |

A dataset whose folder already has its files is skipped. Downloads go to <data>/.downloads/ (resumed from
scratch if interrupted; the partial file is never mistaken for a complete one) and show a progress bar.
`--mirror URL` fetches every archive as URL/<file name> instead (file:// works), for machines without
internet access. Whatever goes wrong on the way (no network, a refused or reset connection, a timeout, a
garbled or truncated reply, an HTTP error, a proxy that fails, a malformed URL) the script stops with one line
saying so. The proxy variables (http_proxy, https_proxy, no_proxy) are honoured, except for a mirror on this
machine (localhost, 127.0.0.0/8, ::1), which is always reached directly: a proxy elsewhere cannot reach it.
Only the standard library is needed (tqdm, when installed, draws the progress bar).
"""
import argparse
import http.client
import ipaddress
import os
import shutil
import sys
import tarfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from utils.io.atomic import atomic_open, copy_file_atomic, write_bytes_atomic, write_text_atomic  # noqa: E402
from utils.io.errors import UserError, run_cli  # noqa: E402

SPLITS = ("train", "valid", "test")
LM1B_ROOT = "1-billion-word-language-modeling-benchmark-r13output"
LM1B_HELDOUT = LM1B_ROOT + "/heldout-monolingual.tokenized.shuffled/news.en.heldout-{:05d}-of-00050"
SOURCES = {
    "wikitext-2-v1.zip": [
        "https://wikitext.smerity.com/wikitext-2-v1.zip",
        "https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-2-v1.zip",
    ],
    "wikitext-103-v1.zip": [
        "https://wikitext.smerity.com/wikitext-103-v1.zip",
        "https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-103-v1.zip",
    ],
    "simple-examples.tgz": ["http://www.fit.vutbr.cz/~imikolov/rnnlm/simple-examples.tgz"],
    "enwik8.zip": ["http://mattmahoney.net/dc/enwik8.zip"],
    "text8.zip": ["http://mattmahoney.net/dc/text8.zip"],
    LM1B_ROOT + ".tar.gz": [f"http://www.statmt.org/lm-benchmark/{LM1B_ROOT}.tar.gz"],
    "1b_word_vocab.txt": ["https://github.com/rafaljozefowicz/lm/raw/master/1b_word_vocab.txt"],
}
DATASETS = ("wt2", "wt103", "ptb", "enwik8", "text8", "lm1b")
_HEADERS = {"User-Agent": "Mozilla/5.0 (transformer-xl getdata)"}  # some hosts refuse urllib's default agent
TIMEOUT_S = 60  # for connecting and for each read
# Everything a download can raise because of the network or the URL (not a bug of this script):
# URLError (refused, DNS, HTTP errors, unknown scheme), OSError (reset, timeout, SSL, disk full),
# HTTPException (garbled status line or headers, truncated body), ValueError (malformed URL or port).
NETWORK_ERRORS = (urllib.error.URLError, OSError, http.client.HTTPException, ValueError)


# ---------------------------------------------------------------------------------------------------------
# Downloading
# ---------------------------------------------------------------------------------------------------------
def download(name: str, downloads: Path, mirror: str | None = None) -> Path:
    """Fetch archive `name` into `downloads` (kept there for re-runs) and return its path."""
    target = downloads / name
    if target.exists():
        return target
    downloads.mkdir(parents=True, exist_ok=True)
    urls = [mirror.rstrip("/") + "/" + name] if mirror else SOURCES[name]
    reasons = []
    for url in urls:
        try:
            _fetch(url, target)
            return target
        except NETWORK_ERRORS as exc:
            reasons.append(f"{url}: {_describe(exc)}")
    raise UserError(
        f"cannot download {name} ({'; '.join(reasons)}); check the network connection, or pass --mirror with "
        "a folder or server that has the file"
    )


def _describe(exc: BaseException) -> str:
    """A short reason for a failed download, on one line (a garbled reply may hold any bytes)."""
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        if not isinstance(exc.reason, BaseException):  # a text such as "unknown url type: ..."
            return " ".join(str(exc.reason).split())[:200]
        exc = exc.reason
    text = " ".join(str(exc).split())[:200]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _is_loopback(url: str) -> bool:
    host = urllib.parse.urlsplit(url).hostname or ""
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _open(url: str):
    """urlopen with the proxy variables as they are now (urlopen reads them once per process), none for a
    mirror on this machine: a proxy elsewhere cannot reach this machine's loopback."""
    proxies = {} if _is_loopback(url) else None  # None: from the environment
    opener = urllib.request.build_opener(urllib.request.ProxyHandler(proxies))
    return opener.open(urllib.request.Request(url, headers=_HEADERS), timeout=TIMEOUT_S)


def _progress(total, name):
    try:
        from tqdm import tqdm
    except ImportError:  # the standard library is enough to download; the bar is a bonus
        return _NoBar()
    return tqdm(total=total, unit="B", unit_scale=True, desc=name, file=sys.stderr)


class _NoBar:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n):
        pass


def _fetch(url: str, target: Path) -> None:
    with _open(url) as response, atomic_open(target, "wb") as out:   # a failed download leaves no file
        total = int(response.headers.get("Content-Length") or 0) or None
        received = 0
        with _progress(total, target.name) as bar:
            while block := response.read(1 << 20):
                out.write(block)
                received += len(block)
                bar.update(len(block))
        if total is not None and received != total:  # a server that closed early without saying so
            raise http.client.IncompleteRead(b"", total - received)


def _complete(folder: Path, names=tuple(f"{s}.txt" for s in SPLITS)) -> bool:
    return all((folder / n).is_file() and (folder / n).stat().st_size > 0 for n in names)


# ---------------------------------------------------------------------------------------------------------
# Preparation (pure functions on bytes / text, tested on tiny inputs)
# ---------------------------------------------------------------------------------------------------------
def split_last(data, n_test: int):
    """(train, valid, test): valid and test are the last 2 * n_test items, n_test each."""
    return data[: -2 * n_test], data[-2 * n_test : -n_test], data[-n_test:]


def enwik8_text(part: bytes) -> str:
    """Byte ids separated by spaces; the newline byte stays a newline (the awd-lstm preparation)."""
    names = [str(b) for b in range(256)]
    names[ord("\n")] = "\n"
    return " ".join(map(names.__getitem__, part))


def text8_text(part: str) -> str:
    """Characters separated by spaces, spaces shown as `_` (the reference's prep_text8)."""
    return " ".join(part.strip().replace(" ", "_"))


def prepare_enwik8(archive: Path, out: Path, n_test: int = 5_000_000) -> None:
    with zipfile.ZipFile(archive) as z:
        data = z.read("enwik8")
    _write_char_splits(out, split_last(data, n_test), enwik8_text)


def prepare_text8(archive: Path, out: Path, n_test: int = 5_000_000) -> None:
    with zipfile.ZipFile(archive) as z:
        data = z.read("text8").decode("utf-8")
    _write_char_splits(out, split_last(data, n_test), text8_text)


def _write_char_splits(out: Path, parts, to_text) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for split, part in zip(SPLITS, parts):
        print(f"  {split}.txt: {len(part):,} characters", flush=True)
        write_bytes_atomic(out / f"{split}.txt.raw", part if isinstance(part, bytes) else part.encode("utf-8"))
    for split, part in zip(SPLITS, parts):  # the .txt files last: they mark the dataset as complete
        write_text_atomic(out / f"{split}.txt", to_text(part))


def prepare_wikitext(archive: Path, out: Path) -> None:
    """wikitext-*/wiki.{train,valid,test}.tokens -> out/{train,valid,test}.txt"""
    out.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(archive) as z:
        members = {Path(n).name: n for n in z.namelist()}
        for split in SPLITS:
            member = members.get(f"wiki.{split}.tokens")
            if member is None:
                raise UserError(f"{archive}: has no wiki.{split}.tokens; the download is damaged, delete it and retry")
            write_bytes_atomic(out / f"{split}.txt", z.read(member))


def prepare_ptb(archive: Path, out: Path, out_char: Path) -> None:
    """simple-examples/data/ptb.{split}.txt -> out/, ptb.char.{split}.txt -> out_char/"""
    with tarfile.open(archive) as tar:
        members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
        for folder, pattern in ((out_char, "ptb.char.{}.txt"), (out, "ptb.{}.txt")):
            folder.mkdir(parents=True, exist_ok=True)
            for split in SPLITS:
                member = members.get(pattern.format(split))
                if member is None:
                    raise UserError(f"{archive}: has no {pattern.format(split)}; the download is damaged")
                write_bytes_atomic(folder / f"{split}.txt", tar.extractfile(member).read())


def prepare_lm1b(archive: Path, vocab: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if not (out / LM1B_ROOT).is_dir():
        print(f"  extracting {archive.name}", flush=True)
        tmp = out / (LM1B_ROOT + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        with tarfile.open(archive) as tar:
            if hasattr(tarfile, "data_filter"):  # refuses links and paths outside the folder
                tar.extractall(tmp, filter="data")
            else:  # Python before 3.10.12 / 3.11.4: check the member paths ourselves
                if any(m.name.startswith(("/", "..")) or "/../" in m.name for m in tar.getmembers()):
                    raise UserError(f"{archive}: unsafe paths in the archive; delete it and retry")
                tar.extractall(tmp)
        os.replace(tmp / LM1B_ROOT, out / LM1B_ROOT)
        shutil.rmtree(tmp, ignore_errors=True)
    copy_file_atomic(vocab, out / "1b_word_vocab.txt")
    # Two different heldout shards (the reference used shard 0 for both): shard 0 is the usual test set.
    for split, shard in (("valid", 1), ("test", 0)):
        source = out / LM1B_HELDOUT.format(shard)
        if not source.is_file():
            raise UserError(f"{source}: missing from {archive.name}; the download is damaged, delete it and retry")
        copy_file_atomic(source, out / f"{split}.txt")


# ---------------------------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------------------------
def get_dataset(name: str, data: Path, mirror: str | None) -> None:
    downloads = data / ".downloads"
    folder = data / {"wt2": "wikitext-2", "wt103": "wikitext-103", "lm1b": "one-billion-words"}.get(name, name)
    if name == "lm1b":
        done = _complete(folder, ("valid.txt", "test.txt", "1b_word_vocab.txt")) and (folder / LM1B_ROOT).is_dir()
    else:
        done = _complete(folder)
    if done:
        print(f"{name}: {folder} already has the data, skipping", flush=True)
        return
    print(f"{name}: downloading into {folder}", flush=True)
    if name in ("wt2", "wt103"):
        prepare_wikitext(download(f"wikitext-{name[2:]}-v1.zip", downloads, mirror), folder)
    elif name == "ptb":
        prepare_ptb(download("simple-examples.tgz", downloads, mirror), folder, data / "pennchar")
    elif name == "enwik8":
        prepare_enwik8(download("enwik8.zip", downloads, mirror), folder)
    elif name == "text8":
        prepare_text8(download("text8.zip", downloads, mirror), folder)
    elif name == "lm1b":
        archive = download(LM1B_ROOT + ".tar.gz", downloads, mirror)
        prepare_lm1b(archive, download("1b_word_vocab.txt", downloads, mirror), folder)
    print(f"{name}: done", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("datasets", nargs="*", metavar="DATASET", help=f"any of {', '.join(DATASETS)} (default: all)")
    parser.add_argument("--data", default=str(Path(__file__).resolve().parent.parent / "data"), help="data folder")
    parser.add_argument("--mirror", default=None, help="fetch every archive as MIRROR/<file name> (http(s):// or file://)")
    args = parser.parse_args(argv)
    unknown = [d for d in args.datasets if d not in DATASETS]
    if unknown:
        raise UserError(f"unknown dataset {unknown[0]!r}; choose from {', '.join(DATASETS)}")
    for name in args.datasets or DATASETS:
        get_dataset(name, Path(args.data), args.mirror)
    return 0


if __name__ == "__main__":
    run_cli(main)
