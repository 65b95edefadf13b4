#!/usr/bin/env python3
"""Data pipeline speed: vocabulary build + encode of WikiText-2 train, cached loads, and a large corpus.

    python scripts/benchmark_data.py [--data DIR] [--big_mb 500] [--repeat 3] [--json FILE]

Figures (best of --repeat runs for the small ones):
1. WikiText-2 train.txt: the reference's algorithm as reference-inventory.md §5.1 describes it (per line:
   tokenize, Counter.update; most_common; one LongTensor per line through get_idx per symbol, then
   torch.cat), written out here as the baseline; ours through the Vocab API (build, then encode_file); ours
   as the cache build does it (one read, provisional ids remapped). Then the whole cache (three splits, files
   written) of --data and of WikiText-103's valid.txt as all three splits (--wt103_valid), each alternated
   with the reference's algorithm on the same files in this process: best of each, the median of the pairs'
   ratios, whether the ids are identical, and a cached load.
2. A corpus of at least --big_mb MB (WikiText-2 train repeated, in a temporary folder deleted afterwards):
   the cache build (in a child process, with its peak memory), then a cached load in a new process (the time
   of get_lm_corpus itself) and the first training batch from the memory-mapped file.
3. With --wiki_mb: a generated Wikipedia-like JSON Lines file (write_wiki_jsonl: Zipf words, about 2 million
   distinct in 200 MB, log-normal article lengths) prepared by scripts/prepare_corpus.py with each of
   --workers (MB/s, peak RSS of the main process and of the largest worker, whether the outputs are the same
   bytes), then the same text flattened to plain text and built by the reference's corpus algorithm
   (count, most_common with max_size, encode) and by prepare_corpus, one after the other (--only_wiki: this
   part alone).

    python scripts/benchmark_data.py --only_wiki --wiki_mb 200 --workers 1,2
"""
import argparse
import collections
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
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


def baseline_wt2_corpus(data: Path, keep: bool = False):
    """The baseline for the whole wt2 corpus: three files counted, three encoded (no cache written). Returns
    the number of ids, or with `keep` the ids of each split (for the check that ours are the same)."""
    vocab = BaselineVocab()
    for split in ("train", "valid", "test"):
        vocab.count_file(data / f"{split}.txt")
    vocab.build_vocab()
    if keep:
        return {split: vocab.encode_file(data / f"{split}.txt").numpy() for split in ("train", "valid", "test")}
    return sum(len(vocab.encode_file(data / f"{split}.txt")) for split in ("train", "valid", "test"))


def cache_comparison(name: str, data: Path, repeat: int, tmp: Path) -> dict:
    """The reference's algorithm on the three splits of `data` and our whole wt2-rule cache build, alternated
    `repeat` times in this process (both see the same load); then whether the ids are the same."""
    builds, loads, corpora = [], [], []
    for i in range(repeat):
        start = time.perf_counter()
        baseline_wt2_corpus(data)
        corpora.append(time.perf_counter() - start)
        cache = tmp / f"cache-{name}-{i}"
        start = time.perf_counter()
        get_lm_corpus(data, "wt2", cache_dir=cache, verbose=False)
        builds.append(time.perf_counter() - start)
        start = time.perf_counter()
        corpus = get_lm_corpus(data, "wt2", cache_dir=cache, verbose=False)
        loads.append(time.perf_counter() - start)
    want = baseline_wt2_corpus(data, keep=True)
    same = all(np.array_equal(np.asarray(getattr(corpus, split)), ids) for split, ids in want.items())
    t_corpus, ratios = min(corpora), [c / b for c, b in zip(corpora, builds)]
    print(f"  {name}: reference algorithm, whole corpus (3 splits) {t_corpus:6.3f} s   (runs: "
          + ", ".join(f"{t:.3f}" for t in corpora) + ")")
    print(f"  {name}: ours, whole cache (3 splits, files written)  {min(builds):6.3f} s   "
          f"{t_corpus / min(builds):4.1f}x faster (best of each; median of the pairs' ratios "
          f"{statistics.median(ratios):.1f}x; runs: " + ", ".join(f"{t:.3f}" for t in builds) + ")")
    print(f"  {name}: ids identical to the reference algorithm's (train, valid, test): {same}; cached load "
          f"{min(loads) * 1000:.1f} ms", flush=True)
    return {"baseline_s": t_corpus, "build_s": min(builds), "load_s": min(loads), "baseline_runs": corpora,
            "build_runs": builds, "median_ratio": statistics.median(ratios), "ids_identical": same}


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


# --------------------------------------------------------------------------------------------------------
# Wikipedia-like JSON Lines and scripts/prepare_corpus.py
# --------------------------------------------------------------------------------------------------------
def write_wiki_jsonl(path: Path, mb: float, seed: int = 0, zipf_s: float = 1.1, max_rank: int = 5_000_000) -> dict:
    """A JSON Lines file of about `mb` MB of articles like Wikipedia's: article lengths log-normal (median 400
    words, some of tens of thousands), paragraphs of about 80 words, words drawn from a Zipf law (exponent
    zipf_s over max_rank ranks: about 2 million distinct words in 200 MB). Rank r is spelled with two letters
    from r then r + 1 in base 26 (unique). Returns what was written."""
    import numpy as np

    rng = np.random.default_rng(seed)
    target = int(mb * 1e6)
    written = n_articles = n_words = 0
    a = 1.0 - zipf_s
    tail = b""
    with open(path, "wb") as f:
        while written < target:
            lengths = np.clip(rng.lognormal(np.log(400), 1.0, 2000), 20, 30000).astype(np.int64)
            n = int(lengths.sum())
            ranks = np.floor((1.0 + rng.random(n) * (max_rank ** a - 1.0)) ** (1.0 / a)).astype(np.int64)
            number = ranks  # >= 1
            digits = np.ones(n, np.int64)
            while (number >= 26 ** digits).any():
                digits += number >= 26 ** digits
            size = digits + 3  # two letters, the digits, one separator
            owner = np.repeat(np.arange(n), size)
            pos = np.arange(len(owner)) - np.repeat(np.cumsum(size) - size, size)
            r, k = ranks[owner], digits[owner]
            letter = np.where(pos < 2, (r * 7919 >> (5 * pos)) % 26,
                              (r // 26 ** np.clip(k - 1 - (pos - 2), 0, 12)) % 26)
            chars = (letter + ord("a")).astype(np.uint8)
            last = np.cumsum(size) - 1
            sep = np.full(n, ord(" "), np.uint8)
            sep[rng.random(n) < 1 / 80] = ord("\n")  # paragraph ends
            sep[np.cumsum(lengths) - 1] = 1  # article ends
            chars[last] = sep
            body = tail + chars.tobytes()
            parts = body.split(b"\x01")
            tail = parts.pop()
            for text in parts:
                text = text.strip().replace(b"\n ", b"\n").replace(b"\n", b"\\n")
                line = b'{"id": %d, "title": "Article %d", "text": "%s"}\n' % (n_articles, n_articles, text)
                f.write(line)
                written += len(line)
                n_articles += 1
                if written >= target:
                    break
            n_words += n
            if written >= target:
                break
    return {"mb": written / 1e6, "articles": n_articles}


def flatten_jsonl(src: Path, dst: Path) -> None:
    """The text of each article of a JSON Lines file, one paragraph per line, a blank line after each article:
    the plain text the reference's corpus code reads."""
    with open(src, encoding="utf-8") as f, open(dst, "w", encoding="utf-8") as out:
        for line in f:
            out.write(json.loads(line)["text"] + "\n\n")


PEAK_RSS = """
def cpu_seconds():  # user + system time of this process and of its finished children (the workers)
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime
def peak_rss_mb():
    # VmHWM: this process's own peak (ru_maxrss would include the parent's memory at the fork before exec)
    try:
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
"""

PREPARE_CHILD = """
import json, resource, time
""" + PEAK_RSS + """
from utils.data.prepare import Options, prepare_corpus
t, cpu0 = time.perf_counter(), cpu_seconds()
m = prepare_corpus({inputs!r}, {out!r}, Options(**{opts!r}), workers={workers}, progress=False)
seconds = time.perf_counter() - t
print(json.dumps({{"seconds": seconds, "cpu_s": cpu_seconds() - cpu0, "main_rss_mb": peak_rss_mb(),
                  "worker_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
                  "tokens": m["n_tokens"], "docs": m["n_docs"], "vocab": m["vocab"]["size"],
                  "unk_fraction": m["unk_fraction"], "exact": m["counting"]["exact"],
                  "decrement": m["counting"]["decrement"], "candidates": m["counting"]["candidates"]}}))
"""

REFERENCE_CHILD = PEAK_RSS + """
import json, resource, sys, time
sys.path.insert(0, {scripts!r})
from benchmark_data import BaselineVocab
class Vocab(BaselineVocab):  # the reference's Vocab with max_size and <unk> (reference-inventory.md 5.1)
    def build_vocab(self):
        self.idx2sym, self.sym2idx = [], {{}}
        for sym in self.special:
            self.add_symbol(sym)
        for sym, cnt in self.counter.most_common({max_size}):
            self.add_symbol(sym)
        self.unk_idx = self.sym2idx["<unk>"]
    def get_idx(self, sym):
        return self.sym2idx.get(sym, self.unk_idx)
t, cpu0 = time.perf_counter(), cpu_seconds()
v = Vocab(special=["<eos>", "<unk>"])
v.count_file({path!r})
v.build_vocab()
n = len(v.encode_file({path!r}))
print(json.dumps({{"seconds": time.perf_counter() - t, "cpu_s": cpu_seconds() - cpu0, "tokens": n, "vocab": len(v.idx2sym),
                  "distinct": len(v.counter), "rss_mb": peak_rss_mb()}}))
"""


CHECK_CHILD = """
import collections, json, random
import numpy as np
from pathlib import Path
src, out, n = {src!r}, Path({out!r}), {n}
counter = collections.Counter()
texts = []
with open(src, encoding="utf-8") as f:
    for line in f:
        text = json.loads(line)["text"]
        counter.update(text.split())
        texts.append(text)
manifest = json.loads((out / "manifest.json").read_text())
idx2sym = json.loads((out / "vocab.json").read_text())["idx2sym"]
top = [w for w, _ in counter.most_common(n)]
eod = idx2sym.index("<eod>")
eods = {{}}
for split, info in manifest["splits"].items():
    ids = np.concatenate([np.load(out / s["file"], mmap_mode="r") for s in info["shards"]])
    eods[split] = [int(np.count_nonzero(ids == eod)), info["n_docs"]]
# decode some articles of the valid split and find them among the inputs (words outside the vocabulary: <unk>)
known = set(idx2sym)
want = lambda t: [w for line in t.split("\\n") if line.split() for w in line.split() + ["<eos>"]] + ["<eod>"]
index = {{}}
for i, t in enumerate(texts):
    index.setdefault(tuple(w if w in known else "<unk>" for w in want(t)), i)
info = manifest["splits"]["valid"]
ids = np.concatenate([np.load(out / s["file"]) for s in info["shards"]])
starts = np.load(out / "valid.docs.npy")
picked = random.Random(0).sample(range(len(starts) - 1), min(20, len(starts) - 1))
decoded_ok = sum(tuple(idx2sym[i] for i in ids[starts[k]:starts[k + 1]]) in index for k in picked)
print(json.dumps({{"distinct": len(counter), "top_n_equal": top == idx2sym[3:3 + n],
                  "eod_per_split": eods, "decoded_ok": decoded_ok, "decoded_checked": len(picked)}}))
"""


def wiki_benchmark(args, tmp: Path, results: dict) -> None:
    """Preparation of a generated Wikipedia-like JSONL with 1 and N workers; the reference's corpus code and
    ours on the same text flattened."""
    src = tmp / "wiki.jsonl"
    made = write_wiki_jsonl(src, args.wiki_mb, seed=0)
    mb = src.stat().st_size / 1e6
    print(f"Wikipedia-like JSONL: {mb:.0f} MB, {made['articles']:,} articles", flush=True)
    opts = {"max_vocab_size": args.max_vocab_size, "title_key": None, "valid_fraction": 0.001, "test_fraction": 0.001}
    rows = {}
    for workers in args.workers:
        got = run_child(PREPARE_CHILD.format(inputs=[str(src)], out=str(tmp / f"out{workers}"), opts=opts,
                                             workers=workers))
        rows[f"jsonl_workers{workers}"] = got
        print(f"  prepare_corpus, {workers} worker(s)      {got['seconds']:7.1f} s  {mb / got['seconds']:5.1f} MB/s  "
              f"peak RSS main {got['main_rss_mb']:.0f} MB, largest worker {got['worker_rss_mb']:.0f} MB; "
              f"{got['tokens']:,} tokens, vocab {got['vocab']:,}, <unk> {100 * got['unk_fraction']:.2f}%, "
              f"exact top-N: {got['exact']}", flush=True)
    first, *others = [tmp / f"out{w}" for w in args.workers]
    same = all(sorted(p.name for p in first.iterdir()) == sorted(p.name for p in o.iterdir()) and
               all((first / p.name).read_bytes() == (o / p.name).read_bytes() for p in first.iterdir()) for o in others)
    print(f"  output bytes identical for workers {args.workers}: {same}", flush=True)
    check = run_child(CHECK_CHILD.format(src=str(src), out=str(first), n=args.max_vocab_size))
    print(f"  check against an exact Counter ({check['distinct']:,} distinct words): top {args.max_vocab_size:,} equal: "
          f"{check['top_n_equal']}; <eod> / articles per split: "
          + ", ".join(f"{k} {a:,}/{b:,}" for k, (a, b) in check["eod_per_split"].items())
          + f"; valid articles decoded equal to an input article (OOV as <unk>): {check['decoded_ok']}/"
          f"{check['decoded_checked']}", flush=True)
    rows["check"] = check
    for w in args.workers:
        shutil.rmtree(tmp / f"out{w}")
    if args.reference:
        flat = tmp / "wiki.txt"
        flatten_jsonl(src, flat)
        print(f"Flattened text: reference algorithm and prepare_corpus ({max(args.workers)} workers), alternated", flush=True)
        refs, ourss = [], []
        for i in range(args.repeat):  # alternated, so that both see the same load of a shared machine
            refs.append(run_child(REFERENCE_CHILD.format(path=str(flat), max_size=args.max_vocab_size,
                                                         scripts=str(REPO / "scripts"))))
            shutil.rmtree(tmp / "flat", ignore_errors=True)
            ourss.append(run_child(PREPARE_CHILD.format(inputs=[str(flat)], out=str(tmp / "flat"), opts={
                **opts, "text_docs": "paragraph"}, workers=max(args.workers))))
            print(f"  run {i + 1}: reference {refs[-1]['seconds']:.1f} s, ours {ourss[-1]['seconds']:.1f} s "
                  f"({refs[-1]['seconds'] / ourss[-1]['seconds']:.1f}x; CPU time {refs[-1]['cpu_s']:.1f} s against "
                  f"{ourss[-1]['cpu_s']:.1f} s in all processes; load average {os.getloadavg()[0]:.1f})", flush=True)
        ref = {**min(refs, key=lambda r: r["seconds"]), "rss_mb": max(r["rss_mb"] for r in refs)}
        ours = {**min(ourss, key=lambda r: r["seconds"]), "main_rss_mb": max(r["main_rss_mb"] for r in ourss),
                "worker_rss_mb": max(r["worker_rss_mb"] for r in ourss)}
        tmb = flat.stat().st_size / 1e6
        ours_rss = ours["main_rss_mb"] + max(args.workers) * ours["worker_rss_mb"]
        print(f"Flattened text ({tmb:.0f} MB), best of {args.repeat} alternated runs:", flush=True)
        print(f"  reference algorithm (count, most_common, encode) {ref['seconds']:7.1f} s  peak RSS {ref['rss_mb']:.0f} MB; "
              f"{ref['tokens']:,} tokens, {ref['distinct']:,} distinct", flush=True)
        print(f"  prepare_corpus, {max(args.workers)} workers (text)      {ours['seconds']:7.1f} s  peak RSS main "
              f"{ours['main_rss_mb']:.0f} MB + {max(args.workers)} x {ours['worker_rss_mb']:.0f} MB = {ours_rss:.0f} MB;"
              f"  {ref['seconds'] / ours['seconds']:.1f}x faster, {ref['rss_mb'] / ours_rss:.1f}x less memory", flush=True)
        pair_ratios = [r["seconds"] / o["seconds"] for r, o in zip(refs, ourss)]
        print(f"  speed-up: best of each {ref['seconds'] / ours['seconds']:.1f}x, median of the pairs "
              f"{statistics.median(pair_ratios):.1f}x (pairs: " + ", ".join(f"{x:.1f}" for x in pair_ratios) + ")",
              flush=True)
        rows["flat_pair_ratios"] = pair_ratios
        rows["flat_reference"], rows["flat_ours"] = ref, ours
    results["wiki"] = {"mb": mb, "articles": made["articles"], "identical": same, **rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "wikitext-2"),
                        help="a WikiText-2 folder (train.txt, valid.txt, test.txt)")
    parser.add_argument("--wt103_valid", default=str(REPO.parent / "shared" / "data" / "wikitext-103" / "valid.txt"),
                        help="WikiText-103's valid.txt: its cache, with the file as all three splits, is also compared "
                             "with the reference's algorithm ('' or a missing file: skipped)")
    parser.add_argument("--big_mb", type=int, default=500, help="size of the large corpus (0: skip it)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per small measurement (best is shown)")
    parser.add_argument("--tmp", default=None, help="folder for the temporary corpora (default: system temp)")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    parser.add_argument("--wiki_mb", type=float, default=0,
                        help="size of a generated Wikipedia-like JSONL to prepare with scripts/prepare_corpus.py (0: skip)")
    parser.add_argument("--workers", type=lambda v: [int(x) for x in v.split(",")], default=[1, os.cpu_count() or 1],
                        help="worker counts to prepare the JSONL with, comma-separated (default: 1 and all cores)")
    parser.add_argument("--max_vocab_size", type=int, default=50000, help="vocabulary size of the JSONL preparation")
    parser.add_argument("--no_reference", dest="reference", action="store_false",
                        help="skip the reference's corpus code on the flattened JSONL")
    parser.add_argument("--only_wiki", action="store_true", help="run the JSONL measurements only")
    args = parser.parse_args()
    if args.only_wiki:
        with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
            results: dict = {"cpus": os.cpu_count(), "load_average": os.getloadavg()}
            wiki_benchmark(args, Path(tmp), results)
        if args.json:
            write_text_atomic(args.json, json.dumps(results, indent=1))
        return 0
    data = Path(args.data)
    train = data / "train.txt"
    if not train.is_file():
        raise UserError(f"{train}: not found; pass --data with a WikiText-2 folder (getdata.sh wt2)")
    results: dict = {"torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(), "load_average": os.getloadavg()}
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
        print(f"Whole cache builds against the reference's algorithm, alternated {args.repeat} times "
              f"(load average {os.getloadavg()[0]:.1f}):", flush=True)
        results["wt2_cache"] = cache_comparison(data.name, data, args.repeat, Path(tmp))
        if args.wt103_valid and Path(args.wt103_valid).is_file():  # WikiText-103's valid.txt as all three splits
            wt103 = Path(tmp) / "wt103-valid-x3"
            wt103.mkdir()
            for split in ("train", "valid", "test"):
                (wt103 / f"{split}.txt").symlink_to(Path(args.wt103_valid).resolve())
            results["wt103_valid_cache"] = cache_comparison("wt103-valid-x3", wt103, args.repeat, Path(tmp))
        results["load_average_after"] = os.getloadavg()

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
        if args.wiki_mb > 0:
            wiki_benchmark(args, Path(tmp), results)
    if args.json:
        write_text_atomic(args.json, json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    run_cli(main)
