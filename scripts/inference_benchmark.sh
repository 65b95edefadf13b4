#!/usr/bin/env bash
# Inference benchmark: eval.py throughput and latency for runtime x precision x batch size, with the paper's
# evaluation protocol (configs/wt103_base.yaml: tgt_len 64, mem_len 640, clamp_len 400, same_length), written
# as a table to $OUT/results.md and results.csv. Without CHECKPOINT: the base model with random weights on a
# synthetic corpus with its vocabulary (no download needed).
#
#   bash scripts/inference_benchmark.sh
#   CHECKPOINT=LM-TFM/checkpoint_best.pt DATA=data/wikitext-103 bash scripts/inference_benchmark.sh
#   TYPES=compile MATHS=bf16 BATCH_SIZES="1 32" MAX_SIZE=300 bash scripts/inference_benchmark.sh   # the targets
#
# Environment (all optional): CHECKPOINT, DATA, OUT (default benchmarks/results/inference), CONFIG_FILE, CONFIG,
# TYPES ("pytorch torchscript compile"), MATHS ("fp32 fp16 bf16"), BATCH_SIZES ("1 2 4 8 16 32"), MAX_SIZE
# (batches per run; default all), NPROC (processes per run, each with its share of the batch), TIMEOUT.
# Arguments after -- go to every eval.py run (e.g. -- --compile_mode reduce-overhead).
set -euo pipefail
cd "$(dirname "$0")/.."
exec python scripts/benchmark_inference.py "$@"
