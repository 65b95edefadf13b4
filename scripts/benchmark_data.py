#!/usr/bin/env python3
"""Data pipeline speed: vocabulary build + encode of WikiText-2 train, cached loads, and a large corpus.

    python scripts/benchmark_data.py [--data DIR] [--big_mb 500] [--repeat 3] [--json FILE]

Figures (best of --repeat runs for the small ones):
1. WikiText-2 train.txt: the reference's algorithm as reference-inventory.md §5.1 describes it (per line:
   tokenize, Counter.update; most_common; one LongTensor per line through get_idx per symbol, then
   torch.cat), written out here as the baseline; ours through the Vocab API (build, then encode_file); ours as the cache build does it (one
   read, provisional ids remapped); the whole wt2 cache (three splits, files written); a cached load.
2. A corpus of at least --big_mb MB (WikiText-2 train repeated, in a temporary folder deleted afterwards):
   the cache build (in a child process, with its peak memory), then a cached load in a new process (the time
   of get_lm_corpus itself) and the first training batch from the memory-mapped file.
"""
import argparse
import collections
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from data_utils import get_lm_corpus  # noqa: E402
from utils.io.atomic import write_text_atomic  # noqa: E402
from utils.io.errors import UserError, run_cli  # noqa: E402
from utils.data.vocabulary import Vocab  # noqa: E402


class BaselineVocab:
    """The reference's vocabulary algorithm as reference-inventory.md §5.1 describes it, restated as the
    baseline: per line tokenize() and Counter.update (the symbol lists kept), specials then most_common via
    add_symbol, and encoding one LongTensor per line through get_indices -> get_idx per symbol."""

    def __init__(self, special=("<eos>",), lower_case=False):
        self.special, self.lower_case = list(special), lower_case
        self.counter = collections.Counter()

    def tokenize(self, line, add_eos=False):
        line = line.strip()
        if self.lower_case:
            line = line.lower()
        symbols = line.split(None)
        return symbols + ["<eos>"] if add_eos else symbols

    def count_file(self, path):
        sents = []
        with open(path, "r", encoding="utf-8") as f:
            for line in f:
                symbols = self.tokenize(line)
                self.counter.update(symbols)
                sents.append(symbols)
        return sents

    def add_symbol(self, sym):
        if sym not in self.sym2idx:
            self.idx2sym.append(sym)
            self.sym2idx[sym] = len(self.idx2sym) - 1

    def build_vocab(self):
        self.idx2sym, self.sym2idx = [], collections.OrderedDict()
        for sym in self.special:
            self.add_symbol(sym)
        for sym, cnt in self.counter.most_common(None):
            self.add_symbol(sym)

    def get_idx(self, sym):
        if sym in self.sym2idx:
            return self.sym2idx[sym]
        raise KeyError(sym)  # (the reference falls back to unk_idx here)

    def get_indices(self, symbols):
        return [self.get_idx(sym) for sym in symbols]

    def convert_to_tensor(self, symbols):
        return torch.LongTensor(self.get_indices(symbols))

    def encode_file(self, path):
        encoded = []
        with open(path, "r", encoding="utf-8") as f:
            for line in f:
                encoded.append(self.convert_to_tensor(self.tokenize(line, add_eos=True)))
        return torch.cat(encoded)


def baseline_build_and_encode(path: Path) -> int:
    vocab = BaselineVocab()
    vocab.count_file(path)
    vocab.build_vocab()
    return len(vocab.encode_file(path))


def baseline_wt2_corpus(data: Path) -> int:
    """The baseline for the whole wt2 corpus: three files counted, three encoded (no cache written)."""
    vocab = BaselineVocab()
    for split in ("train", "valid", "test"):
        vocab.count_file(data / f"{split}.txt")
    vocab.build_vocab()
    return sum(len(vocab.encode_file(data / f"{split}.txt")) for split in ("train", "valid", "test"))


def ours_api(path: Path) -> int:
    vocab = Vocab(special=["<eos>"], lower_case=False).build([path])
    return len(vocab.encode_file(path))


def ours_one_read(path: Path) -> int:
    vocab = Vocab(special=["<eos>"], lower_case=False)
    blocks = []
    vocab.count_file(path, sink=blocks.append)
    vocab.build_vocab()
    return sum(len(ids) for ids, _ in vocab.finish_provisional(blocks, path))


def best_of(repeat: int, fn, *args):
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn(*args)
        times.append(time.perf_counter() - start)
    return min(times), result


def run_child(code: str) -> dict:
    """Run `code` in a new Python process; it prints one JSON line last."""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"child failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


BUILD_CHILD = """
import json, resource, time
from data_utils import get_lm_corpus
t = time.perf_counter()
c = get_lm_corpus({data!r}, 'wt2', cache_dir={cache!r}, verbose=False, progress=False)
print(json.dumps({{"seconds": time.perf_counter() - t, "tokens": len(c.train), "vocab": len(c.vocab),
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""

LOAD_CHILD = """
import json, time
t = time.perf_counter()
from data_utils import get_lm_corpus
t_import = time.perf_counter() - t
t = time.perf_counter()
c = get_lm_corpus({data!r}, 'wt2', cache_dir={cache!r}, verbose=False)
t_load = time.perf_counter() - t
t = time.perf_counter()
it = c.get_iterator('train', 32, 192)
data, target, seq_len, warm = next(iter(it))
t_batch = time.perf_counter() - t
print(json.dumps({{"load": t_load, "first_batch": t_batch, "imports": t_import, "mmap": type(c.train).__name__}}))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "wikitext-2"),
                        help="a WikiText-2 folder (train.txt, valid.txt, test.txt)")
    parser.add_argument("--big_mb", type=int, default=500, help="size of the large corpus (0: skip it)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per small measurement (best is shown)")
    parser.add_argument("--tmp", default=None, help="folder for the temporary corpora (default: system temp)")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()
    data = Path(args.data)
    train = data / "train.txt"
    if not train.is_file():
        raise UserError(f"{train}: not found; pass --data with a WikiText-2 folder (getdata.sh wt2)")
    results: dict = {"torch_threads": torch.get_num_threads(), "cpus": os.cpu_count()}
    size_mb = train.stat().st_size / 1e6

    print(f"WikiText-2 train.txt ({size_mb:.1f} MB), best of {args.repeat}:", flush=True)
    t_base, n = best_of(args.repeat, baseline_build_and_encode, train)
    print(f"  reference algorithm (pure Python, per line)      {t_base:6.2f} s   {n:,} tokens", flush=True)
    t_api, n_api = best_of(args.repeat, ours_api, train)
    t_one, n_one = best_of(args.repeat, ours_one_read, train)
    assert n_api == n_one == n
    print(f"  ours: Vocab.build + encode_file                  {t_api:6.2f} s   {t_base / t_api:4.1f}x faster")
    print(f"  ours: one read, as the cache build does it       {t_one:6.2f} s   {t_base / t_one:4.1f}x faster")
    results["wt2_train"] = {"mb": size_mb, "tokens": n, "baseline_s": t_base, "vocab_api_s": t_api, "one_read_s": t_one}

    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        builds, loads = [], []
        for i in range(args.repeat):
            cache = Path(tmp) / f"cache{i}"
            start = time.perf_counter()
            get_lm_corpus(data, "wt2", cache_dir=cache, verbose=False)
            builds.append(time.perf_counter() - start)
            start = time.perf_counter()
            get_lm_corpus(data, "wt2", cache_dir=cache, verbose=False)
            loads.append(time.perf_counter() - start)
        t_corpus, _ = best_of(args.repeat, baseline_wt2_corpus, data)
        print(f"  reference algorithm, whole wt2 corpus (3 splits) {t_corpus:6.2f} s")
        print(f"  ours: whole wt2 cache (3 splits, files written)  {min(builds):6.2f} s   "
              f"{t_corpus / min(builds):4.1f}x faster")
        print(f"  cached load of wt2                               {min(loads) * 1000:6.1f} ms")
        results["wt2_cache"] = {"baseline_s": t_corpus, "build_s": min(builds), "load_s": min(loads)}

        if args.big_mb > 0:
            big = Path(tmp) / "big"
            big.mkdir()
            copies = math.ceil(args.big_mb * 1e6 / train.stat().st_size)
            text = train.read_bytes()
            with open(big / "train.txt", "wb") as f:
                for _ in range(copies):
                    f.write(text)
            del text
            for split in ("valid", "test"):
                shutil.copyfile(data / f"{split}.txt", big / f"{split}.txt")
            big_mb = (big / "train.txt").stat().st_size / 1e6
            print(f"Large corpus: WikiText-2 train x{copies} = {big_mb:.0f} MB", flush=True)
            cache = str(Path(tmp) / "bigcache")
            built = run_child(BUILD_CHILD.format(data=str(big), cache=cache))
            print(f"  cache build                                      {built['seconds']:6.1f} s   "
                  f"{built['tokens']:,} tokens, peak memory {built['peak_rss_mb']:.0f} MB", flush=True)
            loaded = run_child(LOAD_CHILD.format(data=str(big), cache=cache))
            print(f"  cached load in a new process ({loaded['mmap']})            {loaded['load'] * 1000:6.1f} ms")
            print(f"  first training batch (32 x 192) from the map     {loaded['first_batch'] * 1000:6.1f} ms")
            results["large"] = {"mb": big_mb, "copies": copies, "build": built, "load": loaded}
    if args.json:
        write_text_atomic(args.json, json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    run_cli(main)
