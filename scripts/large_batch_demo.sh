#!/usr/bin/env bash
# Large-batch training in small, on the CPU (README "Moving a recipe to more GPUs", the demo's figure):
# the cpu_small demo preset trained for the same number of tokens at global batch 16 (the base batch, lr 0.01)
# and at global batch 64 with each --lr_scaling rule (none: 0.01, sqrt: 0.02, linear: 0.04), warm-up and
# cosine decay counted in tokens, validated every 25600 tokens. Then scripts/large_batch_demo.py plots the
# validation perplexity against tokens (large_batch_demo.png) and prints the table of final perplexities.
#   bash scripts/large_batch_demo.sh [OUT_DIR]          (about 5 minutes on 2 CPU cores)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
OUT=${1:-results/large_batch_demo}
DATA=${DATA:-data/demo}
TOKENS=${TOKENS:-204800}          # 200 steps at batch 64 x tgt_len 16
[ -f "$DATA/train.txt" ] || "$PYTHON" -m utils.data.demo_corpus "$DATA"
mkdir -p "$OUT"
run() {  # name batch rule
  local name=$1 batch=$2 rule=$3
  local eval_interval=$((25600 / (batch * 16)))
  OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "$PYTHON" train.py --config_file configs/cpu_small.yaml --config demo \
    --data "$DATA" --work_dir "$OUT/$name" --overwrite --no_env --batch_size "$batch" --lr 0.01 \
    --lr_scaling "$rule" --base_batch_size 16 --warmup_tokens 25600 --max_tokens "$TOKENS" \
    --eval_interval "$eval_interval" --log_interval "$eval_interval" --no_test > "$OUT/$name.log"
  echo "trained $name"
}
run batch16 16 none
run batch64_none 64 none
run batch64_sqrt 64 sqrt
run batch64_linear 64 linear
"$PYTHON" scripts/large_batch_demo.py "$OUT" batch16 batch64_none batch64_sqrt batch64_linear
