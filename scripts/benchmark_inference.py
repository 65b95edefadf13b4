#!/usr/bin/env python3
"""Inference throughput and latency of eval.py: runtime x precision x batch size, as a table.

    bash scripts/inference_benchmark.sh                     # the same, with environment variables
    python scripts/benchmark_inference.py --checkpoint LM-TFM/checkpoint_best.pt --data data/wikitext-103
    python scripts/benchmark_inference.py --types compile --precisions bf16 --batch_sizes 1 32   # the targets

Each configuration is one `eval.py --save_data` run (a fresh process, as the reference's
inference_benchmark.sh did) with a preset's evaluation protocol, by default configs/wt103_base.yaml: the
paper's (tgt_len 64, mem_len 640, clamp_len 400, same_length, test split). The reported figures are
eval.py's own: per-batch throughput and latency after the warm-up batches (mem_len // tgt_len + 2), with the
device synchronized around each forward pass.

Without --checkpoint the preset `manual_eval` is used: the base model with random weights (speed does not
depend on the weights), evaluated on a synthetic corpus written to <out_dir>/synthetic-wt103-freq whose
vocabulary has exactly the base model's 267,735 words and whose test split has WikiText-103's length and
its rank-frequency curve (utils/data/token_frequencies.py, fitted from its validation and test splits: 95.2%
of the tokens in the shortlist), so the adaptive softmax sees its clusters in realistic proportions.

Writes <out_dir>/results.md and results.csv, and prints the table next to the reference's published
figures; with bf16 rows, also the targets (batch 32 >= 500,000 tok/s, batch 1 < 5 ms per segment).
A configuration that cannot run on the device is listed with eval.py's one-line error.
"""
import argparse
import csv
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from utils.data.token_frequencies import rank_probabilities  # noqa: E402
from utils.io.atomic import atomic_open, write_text_atomic  # noqa: E402

TYPES = ("pytorch", "torchscript", "compile")
PRECISIONS = ("fp32", "fp16", "bf16")
BATCH_SIZES = (1, 2, 4, 8, 16, 32)
BASE_VOCAB = 267735                  # the wt103 base model's n_token (configs/wt103_base.yaml manual_eval)
WT103_TEST_TOKENS = 245569           # tokens of WikiText-103's test split, line ends included
# The reference's published figures (NVIDIA DeepLearningExamples Transformer-XL README, base model,
# tgt_len 64, mem_len 640; see ../shared/spec/reference-inventory.md §7.4 and the issue text).
REFERENCE = [
    ("A100", "torchscript", "fp16", 32, "107,082 tok/s", ""),
    ("A100", "torchscript", "fp16", 1, "", "9.2 ms"),
    ("A100", "torchscript", "fp16", 16, "90,768 tok/s", ""),
    ("A100", "pytorch", "fp16", 16, "59,379 tok/s", ""),
    ("V100", "torchscript", "fp16", 16, "57,840 tok/s", ""),
    ("V100", "pytorch", "fp16", 16, "41,482 tok/s", ""),
]
TARGETS = {"throughput_bs32": 500_000.0, "latency_bs1_ms": 5.0}
_RESULT = re.compile(r"\| test loss +(\S+) \| test ppl +(\S+)")


def parse_args():
    env = os.environ.get
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=env("CHECKPOINT") or None,
                        help="checkpoint to evaluate (default: the base model with random weights)")
    parser.add_argument("--data", default=env("DATA") or None,
                        help="corpus folder (default with a checkpoint: the preset's; without: a synthetic one)")
    parser.add_argument("--out_dir", default=env("OUT", "benchmarks/results/inference"), help="where results go")
    parser.add_argument("--config_file", default=env("CONFIG_FILE", "configs/wt103_base.yaml"))
    parser.add_argument("--config", default=env("CONFIG") or None,
                        help="preset (default: 'default' with a checkpoint, 'manual_eval' without)")
    parser.add_argument("--types", nargs="+", default=env("TYPES", " ".join(TYPES)).split(), choices=TYPES)
    parser.add_argument("--precisions", nargs="+", default=env("MATHS", " ".join(PRECISIONS)).split(),
                        choices=PRECISIONS)
    parser.add_argument("--batch_sizes", nargs="+", type=int,
                        default=[int(b) for b in env("BATCH_SIZES", " ".join(map(str, BATCH_SIZES))).split()])
    parser.add_argument("--max_size", type=int, default=int(env("MAX_SIZE", "0")) or None,
                        help="at most this many batches per run (default: the whole split)")
    parser.add_argument("--nproc", type=int, default=int(env("NPROC", "1")),
                        help="processes (GPUs) per run, each evaluating its share of the batch")
    parser.add_argument("--timeout", type=int, default=int(env("TIMEOUT", "3600")), help="seconds per run")
    parser.add_argument("eval_args", nargs=argparse.REMAINDER, help="after --: more eval.py flags")
    return parser.parse_args()


# ---- synthetic corpus -----------------------------------------------------------------------------------
def word(i: int) -> str:
    """A distinct lower-case word for rank i (base-26 digits, at least 3 letters)."""
    letters = ""
    i += 26 * 26
    while i:
        i, r = divmod(i, 26)
        letters = chr(97 + r) + letters
    return letters


def write_synthetic_corpus(folder: Path, n_token: int = BASE_VOCAB, test_tokens: int = WT103_TEST_TOKENS) -> Path:
    """train.txt holds n_token - 1 distinct words once each (the wt103 rules add <eos>, giving n_token ids in
    the order written); valid/test.txt hold words drawn from WikiText-103's rank-frequency curve, 100 per line."""
    if (folder / "test.txt").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    words = [word(i) for i in range(n_token - 1)]
    rng = np.random.default_rng(0)
    cumulative = np.cumsum(rank_probabilities(n_token - 1))
    files = {"train.txt": "\n".join(" ".join(words[i:i + 100]) for i in range(0, len(words), 100)) + "\n"}
    for split, n in (("valid.txt", test_tokens // 10), ("test.txt", test_tokens)):
        n_words = n * 100 // 101                                           # each line adds <eos>
        ranks = np.searchsorted(cumulative, rng.random(n_words), side="right").clip(max=n_token - 2)
        files[split] = "\n".join(" ".join(words[r] for r in ranks[i:i + 100]) for i in range(0, n_words, 100)) + "\n"
    for name, text in files.items():
        write_text_atomic(folder / name, text)
    return folder


# ---- runs -----------------------------------------------------------------------------------------------
def eval_command(args, data: str, runtime: str, precision: str, bsz: int, work_dir: Path) -> list:
    launcher = [sys.executable]
    if args.nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc)]
    cmd = launcher + ["eval.py", "--config_file", args.config_file, "--config", args.config, "--data", data,
                      "--work_dir", str(work_dir), "--type", runtime, "--batch_size", str(bsz), "--save_data",
                      "--log_interval", "1000000", "--split", "test"]
    if args.checkpoint:
        cmd += ["--model", args.checkpoint]
    if precision != "fp32":
        cmd.append(f"--{precision}")
    if args.max_size:
        cmd += ["--max_size", str(args.max_size)]
    extra = args.eval_args[1:] if args.eval_args[:1] == ["--"] else args.eval_args
    return cmd + extra


def run_one(args, data: str, runtime: str, precision: str, bsz: int) -> dict:
    work_dir = Path(args.out_dir) / "runs" / f"{runtime}_{precision}_bs{bsz}"
    work_dir.mkdir(parents=True, exist_ok=True)
    cmd = eval_command(args, data, runtime, precision, bsz, work_dir)
    row = {"type": runtime, "precision": precision, "batch_size": bsz}
    start = time.time()
    try:
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {**row, "error": f"timed out after {args.timeout}s"}
    (work_dir / "stdout.txt").write_text(done.stdout)
    (work_dir / "stderr.txt").write_text(done.stderr)
    row["wall_s"] = round(time.time() - start, 1)
    if done.returncode not in (0, 1):                       # 1: a --target_* check failed, figures are there
        errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
        tail = errors[-1] if errors else (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {**row, "error": tail[:300]}
    data_file = work_dir / f"eval_data_{bsz}_{precision}_{runtime}.json"
    if not data_file.is_file():
        return {**row, "error": "no timing samples (too few batches after the warm-up; raise --max_size)"}
    saved = json.loads(data_file.read_text())
    latency, throughput = np.array(saved["latency"]), np.array(saved["throughput"])
    result = _RESULT.search(done.stdout)
    row.update(device=saved.get("device", ""), batches=int(latency.size),
               throughput=float(throughput.mean()), latency_ms=float(latency.mean()),
               p90_ms=float(np.percentile(latency, 90)), p95_ms=float(np.percentile(latency, 95)),
               p99_ms=float(np.percentile(latency, 99)), ppl=result.group(2) if result else "")
    return row


# ---- table ----------------------------------------------------------------------------------------------
COLUMNS = ["type", "precision", "batch_size", "throughput", "latency_ms", "p90_ms", "p95_ms", "p99_ms", "batches",
           "ppl", "wall_s", "error"]


def markdown(rows: list, header: str) -> str:
    lines = [header, "", "| Runtime | Precision | Batch | Throughput Avg (tok/s) | Latency Avg (ms) | 90% (ms) | "
             "95% (ms) | 99% (ms) | Timed batches | Test ppl |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['type']} | {r['precision']} | {r['batch_size']} | {r['error']} ||||||")
            continue
        lines.append(f"| {r['type']} | {r['precision']} | {r['batch_size']} | {r['throughput']:,.0f} | "
                     f"{r['latency_ms']:.2f} | {r['p90_ms']:.2f} | {r['p95_ms']:.2f} | {r['p99_ms']:.2f} | "
                     f"{r['batches']} | {r['ppl']} |")
    lines += ["", "The reference's published figures (base model, tgt_len 64, mem_len 640):", "",
              "| GPU | Runtime | Precision | Batch | Throughput | Latency Avg |", "|---|---|---|---:|---:|---:|"]
    lines += [f"| {g} | {t} | {p} | {b} | {tp} | {lat} |" for g, t, p, b, tp, lat in REFERENCE]
    lines += ["", *targets(rows)]
    return "\n".join(lines) + "\n"


def targets(rows: list) -> list:
    """The bf16 targets against the best runtime measured for each."""
    ok = [r for r in rows if "error" not in r and r["precision"] == "bf16"]
    out = []
    bs32 = [r for r in ok if r["batch_size"] == 32]
    if bs32:
        best = max(bs32, key=lambda r: r["throughput"])
        passed = best["throughput"] >= TARGETS["throughput_bs32"]
        out.append(f"Target batch 32 bf16 >= {TARGETS['throughput_bs32']:,.0f} tok/s: {best['throughput']:,.0f} "
                   f"({best['type']}) -> {'passed' if passed else 'failed'}")
    bs1 = [r for r in ok if r["batch_size"] == 1]
    if bs1:
        best = min(bs1, key=lambda r: r["latency_ms"])
        passed = best["latency_ms"] < TARGETS["latency_bs1_ms"]
        out.append(f"Target batch 1 bf16 < {TARGETS['latency_bs1_ms']} ms per segment: {best['latency_ms']:.2f} ms "
                   f"({best['type']}) -> {'passed' if passed else 'failed'}")
    return out


def main() -> int:
    args = parse_args()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    args.config = args.config or ("default" if args.checkpoint else "manual_eval")
    data = args.data
    if data is None and not args.checkpoint:
        folder = out / "synthetic-wt103-freq"                  # -freq: not the older Zipf 1.1 corpus
        print(f"writing a synthetic corpus with the base model's vocabulary to {folder}", flush=True)
        data = str(write_synthetic_corpus(folder).resolve())
    data = data or "data/wikitext-103"

    rows = []
    for runtime in args.types:
        for precision in args.precisions:
            for bsz in args.batch_sizes:
                row = run_one(args, data, runtime, precision, bsz)
                rows.append(row)
                shown = row.get("error") or (f"{row['throughput']:,.0f} tok/s, {row['latency_ms']:.2f} ms "
                                             f"(p99 {row['p99_ms']:.2f} ms)")
                print(f"{runtime:>11} {precision} bs {bsz:>2}: {shown}", flush=True)

    device = next((r["device"] for r in rows if r.get("device")), platform.processor() or "unknown")
    header = (f"# eval.py inference benchmark\n\nDevice: {device} x {args.nproc}; preset {args.config_file} "
              f"[{args.config}]; data {args.data or ('synthetic' if not args.checkpoint else data)}; "
              f"checkpoint {args.checkpoint or 'none (random weights)'}; max_size {args.max_size or 'all'}.\n"
              f"Command: python scripts/benchmark_inference.py {shlex.join(sys.argv[1:])}")
    table = markdown(rows, header)
    write_text_atomic(out / "results.md", table)
    with atomic_open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    print()
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
