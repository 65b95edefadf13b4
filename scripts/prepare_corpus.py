#!/usr/bin/env python3
"""Prepare a large corpus (JSON Lines, JSON arrays, Wikipedia extractor output, plain text; compressed or not)
into token-id shards for `train.py --dataset prepared --data DIR`.

    python scripts/prepare_corpus.py wiki.jsonl.bz2 --output data/wiki --max_vocab_size 267735 --workers 8
    python scripts/prepare_corpus.py --verify data/wiki

See utils/data/prepare.py for the passes, the memory bound and the output files, and docs/data.md.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from utils.data.prepare import INPUT_FORMATS, TEXT_DOCS, Options, prepare_corpus, verify  # noqa: E402
from utils.io.errors import UserError, run_cli  # noqa: E402


def parse_args(argv=None):
    d = Options()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("inputs", nargs="*", help="input files or folders (.gz, .bz2, .xz read as they are decompressed)")
    p.add_argument("--output", help="the folder to write (shards, docs index, vocab.json, manifest.json)")
    p.add_argument("--verify", metavar="DIR", help="check a prepared folder's files against its manifest and exit")
    g = p.add_argument_group("reading")
    g.add_argument("--format", dest="input_format", default=d.input_format, choices=INPUT_FORMATS,
                   help="input format (auto: by extension and first bytes)")
    g.add_argument("--text_key", default=d.text_key, help="JSON key of an article's text")
    g.add_argument("--title_key", default=d.title_key, help="JSON key of an article's title (written as its first line)")
    g.add_argument("--text_docs", default=d.text_docs, choices=TEXT_DOCS,
                   help="plain text: one article per file, per blank-line separated paragraph, or per line")
    g.add_argument("--skip_bad_lines", action="store_true", help="skip (and count) JSON lines that do not parse or "
                   "have no text, instead of stopping")
    g = p.add_argument_group("tokens")
    g.add_argument("--level", default=d.level, choices=("word", "char", "bpe"),
                   help="word or character tokens, or a byte-level BPE trained on a sample of the articles")
    g.add_argument("--bpe_vocab_size", type=int, default=d.bpe_vocab_size, help="--level bpe: tokens of the BPE")
    g.add_argument("--bpe_sample_mb", type=float, default=d.bpe_sample_mb,
                   help="--level bpe: MB of article text (the first ones) the BPE is trained on")
    g.add_argument("--lower_case", action="store_true", help="lower-case the text")
    g.add_argument("--moses", action="store_true", help="Moses-tokenize each line (sacremoses; slow)")
    g.add_argument("--moses_lang", default=d.moses_lang, help="language of the Moses tokenizer")
    g.add_argument("--doc_separator", default=d.doc_separator, help="symbol that closes each article")
    g = p.add_argument_group("vocabulary")
    g.add_argument("--max_vocab_size", type=int, default=d.max_vocab_size,
                   help="keep the N most frequent symbols (the others become <unk>)")
    g.add_argument("--min_freq", type=int, default=d.min_freq, help="drop symbols seen fewer times")
    g.add_argument("--count_capacity", type=int, default=d.count_capacity,
                   help="symbols the bounded counter keeps (it holds at most twice this many)")
    g = p.add_argument_group("splits and output")
    for split in ("valid", "test"):
        g.add_argument(f"--{split}_docs", type=int, default=None, help=f"articles drawn for the {split} split")
        g.add_argument(f"--{split}_fraction", type=float, default=None,
                       help=f"fraction of the articles drawn for the {split} split (default 0.001, at least 1)")
    g.add_argument("--seed", type=int, default=d.seed, help="seed of the split draw")
    g.add_argument("--shard_tokens", type=int, default=d.shard_tokens, help="tokens per .npy shard")
    g.add_argument("--overwrite", action="store_true", help="replace a prepared corpus in --output")
    g = p.add_argument_group("running")
    g.add_argument("--workers", type=int, default=None, help="worker processes (default: all cores); the output is "
                   "the same for any number")
    g.add_argument("--chunk_mb", type=float, default=d.chunk_bytes / (1 << 20), help="MB of input per work unit")
    g.add_argument("--no_progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.verify:
        manifest = verify(args.verify)
        print(f"{args.verify}: all files match manifest.json ({manifest['n_tokens']:,} tokens)")
        return 0
    if not args.output:
        raise UserError("--output is required: the folder to write the prepared corpus to")
    if args.workers is not None and args.workers < 1:
        raise UserError("--workers must be at least 1")
    keys = Options.__dataclass_fields__.keys() - {"chunk_bytes"}
    opts = Options(**{k: getattr(args, k) for k in keys}, chunk_bytes=max(1, int(args.chunk_mb * (1 << 20))))
    prepare_corpus(args.inputs, args.output, opts, workers=args.workers, progress=not args.no_progress,
                   verbose=True, overwrite=args.overwrite)
    return 0


if __name__ == "__main__":
    run_cli(main)
