#!/usr/bin/env python3
"""Learning curves of one or more training runs in one PNG, to compare them.

    python scripts/plot_runs.py runs/base runs/no-memory -o curves.png [--title "memory vs none"]

Each RUN_DIR is a train.py work directory (its train_log.json). Drawn: training loss and validation perplexity
(bits per character for character-level corpora) against steps and against tokens, the learning rate and the
throughput; one line per run, named after its folder. Works while the runs are still training.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from utils.io.errors import run_cli  # noqa: E402
from utils.training.plots import load_run, plot_runs, unique_names  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="train.py work directories")
    parser.add_argument("-o", "--output", default="curves.png", help="the PNG to write (default: curves.png)")
    parser.add_argument("--title", default=None, help="a title above the plots")
    args = parser.parse_args(argv)
    paths = [Path(p) for p in args.runs]
    runs = [load_run(path, name) for path, name in zip(paths, unique_names(paths))]
    out = plot_runs(runs, args.output, args.title)
    print(f"wrote {out} ({len(runs)} run{'s' if len(runs) > 1 else ''})")
    return 0


if __name__ == "__main__":
    run_cli(main)
