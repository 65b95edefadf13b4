#!/usr/bin/env python
"""CPU training benchmark: the configs/cpu_small.yaml default preset on WikiText-2, float32.

    python scripts/benchmark_cpu_wt2.py [--data DIR] [--max_step 300] [--threads N] [-- extra train.py flags]

The preset: 4 layers, d_model 256, 4 heads of 64, d_inner 1024, tgt_len = mem_len = 64, batch 16, LAMB
lr 0.01 with 50 warm-up steps. The run trains `--max_step` steps (evaluating only at the end, no final test)
and prints the training throughput (train.py's `Training throughput`, which leaves out the first
mem_len // tgt_len + 2 log intervals and the evaluation time), the validation perplexity after the last step,
and the machine's load and the run's CPU time, since on a shared machine the figure depends on what else runs
(with other processes on the cores, --threads 1 avoids OpenMP threads waiting for each other).

--data defaults to ../shared/data/wikitext-2 when it exists (development machines), else data/wikitext-2
(./getdata.sh wt2).
"""
import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def default_data() -> Path:
    shared = REPO.parent / "shared" / "data" / "wikitext-2"
    return shared if shared.is_dir() else REPO / "data" / "wikitext-2"


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=default_data(), help="WikiText-2 folder")
    parser.add_argument("--max_step", type=int, default=300)
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for the run (default: torch's)")
    parser.add_argument("--work_dir", type=Path, default=None, help="default: a temporary folder, removed after")
    parser.add_argument("extra", nargs="*", help="more train.py flags (after --)")
    args = parser.parse_args()
    if not args.data.is_dir():
        print(f"error: {args.data} not found; download WikiText-2 with ./getdata.sh or pass --data", file=sys.stderr)
        return 2

    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="txl-bench-"))
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    command = [sys.executable, str(REPO / "train.py"), "--config_file", str(REPO / "configs" / "cpu_small.yaml"),
               "--data", str(args.data), "--work_dir", str(work_dir), "--no_cuda", "--max_step", str(args.max_step),
               "--eval_interval", str(args.max_step), "--log_interval", "10", "--no_test", *args.extra]
    print("command:", " ".join(command), flush=True)
    print(f"cpus: {os.cpu_count()}  threads: {args.threads or 'torch default'}  "
          f"load average before: {load_average()}", flush=True)
    start = time.time()
    result = subprocess.run(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.time() - start
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(f"load average after: {load_average()}  wall time: {wall:.0f} s  CPU time: user {usage.ru_utime:.0f} s, "
          f"system {usage.ru_stime:.0f} s (the whole run: start-up, cache, training, evaluation)")
    if result.returncode != 0:
        print(result.stdout[-4000:])
        print(f"error: train.py exited with {result.returncode}", file=sys.stderr)
        return result.returncode

    records = [json.loads(line) for line in (work_dir / "train_log.json").read_text().splitlines()]
    summary = next(r for r in records if r["step"] == "SUMMARY")
    throughput_line = next((l for l in result.stdout.splitlines() if l.startswith("Training throughput")), "")
    tok_s = [r["train_throughput"] for r in records if "train_throughput" in r and isinstance(r["step"], int)]
    print(throughput_line)
    print(f"tok/s per log interval: median {sorted(tok_s)[len(tok_s) // 2]:.0f}, min {min(tok_s):.0f}, "
          f"max {max(tok_s):.0f} ({len(tok_s)} intervals)")
    print(f"validation perplexity after {args.max_step} steps: {summary['valid_perplexity']:.3f} "
          f"(loss {summary['valid_loss']:.4f})")
    print(f"benchmark: {summary['train_throughput']:.0f} tok/s, valid ppl {summary['valid_perplexity']:.2f}")
    if args.work_dir is None:
        shutil.rmtree(work_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
