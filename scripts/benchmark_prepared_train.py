#!/usr/bin/env python3
"""Memory per rank when training from a prepared corpus does not grow with the corpus.

    python scripts/benchmark_prepared_train.py [--small_mb 5] [--factor 10] [--steps 20] [--tmp DIR]

Generates a Wikipedia-like JSONL of --small_mb MB and one --factor times larger (benchmark_data.py's
generator), prepares both (scripts/prepare_corpus.py, the same --max_vocab_size, so the same model), trains a
tiny model on each for --steps steps on 2 gloo ranks (torchrun, CPU), and prints every rank's peak RSS (VmHWM)
for both corpora, and the difference.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from benchmark_data import write_wiki_jsonl  # noqa: E402
from utils.data.prepare import Options, prepare_corpus  # noqa: E402
from utils.io.atomic import write_text_atomic  # noqa: E402
from utils.io.errors import run_cli  # noqa: E402

# Runs train.py in this process and reports this process's peak RSS when it exits (each rank of torchrun).
RANK_WRAPPER = """
import atexit, os, runpy, sys
def report():
    with open("/proc/self/status") as f:
        hwm = next(int(l.split()[1]) for l in f if l.startswith("VmHWM:"))
    print(f"PEAK_RSS rank={os.environ.get('RANK', '0')} kb={hwm}", file=sys.stderr, flush=True)
atexit.register(report)
sys.argv = sys.argv[1:]
sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0]))  # as if the script were run itself
runpy.run_path(sys.argv[0], run_name="__main__")
"""

TRAIN_FLAGS = ["--config_file", "configs/cpu_small.yaml", "--config", "demo", "--no_cuda", "--dropout", "0",
               "--batch_size", "8", "--eval_batch_size", "8", "--log_interval", "5", "--eval_interval", "1000",
               "--warmup_step", "5", "--tgt_len", "32", "--mem_len", "32", "--eval_tgt_len", "32", "--no_test"]


def train_two_ranks(data: Path, work: Path, steps: int, wrapper: Path) -> dict[int, float]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(wrapper),
           "train.py", *TRAIN_FLAGS, "--dataset", "prepared", "--data", str(data), "--work_dir", str(work),
           "--max_step", str(steps)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    if proc.returncode != 0:
        raise RuntimeError(f"training failed:\n{proc.stderr[-3000:]}")
    found = re.findall(r"PEAK_RSS rank=(\d+) kb=(\d+)", proc.stderr)
    return {int(r): int(kb) / 1024 for r, kb in found}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small_mb", type=float, default=5)
    parser.add_argument("--factor", type=float, default=10)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--max_vocab_size", type=int, default=20000)
    parser.add_argument("--tmp", default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        tmp = Path(tmp)
        wrapper = tmp / "rank_rss.py"
        write_text_atomic(wrapper, RANK_WRAPPER)
        for name, mb in (("small", args.small_mb), ("large", args.small_mb * args.factor)):
            src = tmp / f"{name}.jsonl"
            write_wiki_jsonl(src, mb, seed=1)
            out = tmp / f"{name}-prepared"
            manifest = prepare_corpus([src], out, Options(max_vocab_size=args.max_vocab_size, shard_tokens=1 << 20),
                                      workers=2)
            src.unlink()
            started = time.perf_counter()
            rss = train_two_ranks(out, tmp / f"{name}-work", args.steps, wrapper)
            results[name] = {"mb": mb, "tokens": manifest["n_tokens"], "shards": len(manifest["splits"]["train"]["shards"]),
                             "rank_peak_rss_mb": rss, "seconds": time.perf_counter() - started}
            print(f"{name}: {mb:.0f} MB of JSONL, {manifest['n_tokens']:,} tokens in "
                  f"{results[name]['shards']} train shards; peak RSS per rank: "
                  + ", ".join(f"rank {r} {v:.0f} MB" for r, v in sorted(rss.items())), flush=True)
    diff = {r: results["large"]["rank_peak_rss_mb"][r] - results["small"]["rank_peak_rss_mb"][r]
            for r in results["small"]["rank_peak_rss_mb"]}
    print("difference (large - small): " + ", ".join(f"rank {r} {v:+.0f} MB" for r, v in sorted(diff.items())))
    results["difference_mb"] = diff
    if args.json:
        write_text_atomic(args.json, json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    run_cli(main)
