#!/usr/bin/env python3
"""Compare the throughput of several commands on a shared, noisy machine: alternating runs, medians.

    python scripts/benchmark_ab.py --runs 5 --log_dir benchmarks/results/cpu/ab \\
        --cmd "before=cd /tmp/old && python train.py --config_file configs/cpu_small.yaml ..." \\
        --cmd "after=python train.py --config_file configs/cpu_small.yaml ..."

Each round runs every command once, in turn (A B A B ...), so slow and quiet periods of the machine hit all
of them alike. The figure of a run is the last `Training throughput: X tok/s` (train.py) or `tokens/s X`
(scripts/benchmark_train.py) it printed. Printed per command: every run, the median, min and max, and the
machine's 1-minute load average before each run. --log_dir keeps each run's full output.
"""
import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

PATTERNS = [re.compile(r"Training throughput: ([0-9.]+) tok/s"), re.compile(r"tokens/s ([0-9.]+)")]


def throughput(output: str) -> float | None:
    for pattern in PATTERNS:
        found = pattern.findall(output)
        if found:
            return float(found[-1])
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--cmd", action="append", required=True, metavar="NAME=COMMAND",
                        help="a shell command and its name (repeat for each variant)")
    parser.add_argument("--runs", type=int, default=3, help="rounds (each runs every command once)")
    parser.add_argument("--log_dir", default=None, help="keep each run's output here")
    args = parser.parse_args()
    commands = []
    for item in args.cmd:
        name, sep, command = item.partition("=")
        if not sep or not name or not command:
            parser.error(f"--cmd expects NAME=COMMAND, got {item!r}")
        commands.append((name, command))
    if args.log_dir:
        Path(args.log_dir).mkdir(parents=True, exist_ok=True)
    results = {name: [] for name, _ in commands}
    for round_ in range(args.runs):
        for name, command in commands:
            load = os.getloadavg()[0]
            start = time.time()
            proc = subprocess.run(command, shell=True, capture_output=True, text=True)
            output = proc.stdout + proc.stderr
            value = throughput(output)
            if args.log_dir:
                Path(args.log_dir, f"{name}_{round_ + 1}.log").write_text(
                    f"$ {command}\n# load average before: {load:.2f}; exit {proc.returncode}\n{output}")
            if proc.returncode != 0 or value is None:
                print(f"{name} run {round_ + 1}: failed (exit {proc.returncode})\n{output[-2000:]}", file=sys.stderr)
                return 1
            results[name].append((value, load))
            print(f"round {round_ + 1} {name:>12}: {value:9.1f} tok/s  ({time.time() - start:6.1f} s, "
                  f"load before {load:.2f})", flush=True)
    print()
    for name, _ in commands:
        values = [v for v, _ in results[name]]
        print(f"{name:>12}: median {statistics.median(values):9.1f} tok/s | min {min(values):9.1f} | "
              f"max {max(values):9.1f} | runs {', '.join(f'{v:.0f}' for v in values)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
