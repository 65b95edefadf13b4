#!/bin/bash
# Transformer-XL large on WikiText-103 over several nodes (the reference's 8 x DGX-2 recipe).
#
#   bash run_multinode_wt103_large.sh {train|eval|all} [flags for train.py / eval.py]
#
# Runs ONE process; start it once per GPU: Slurm's srun does (see run.sub: `sbatch -N 8 run.sub all`), and so
# does any launcher that sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT (torchrun). Without a
# launcher it trains in one process. The preset is 8dgx2_16gpu_fp16 (128 GPUs); --config <N>dgx2_16gpu_{fp16,fp32}
# picks the one for N nodes, and later flags override earlier ones. In `all` mode the extra flags go to
# both train.py and eval.py, so they must be flags that both accept.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
PYTHON=${PYTHON:-python}
PRESET=(--config_file wt103_large.yaml --config 8dgx2_16gpu_fp16)

mode=${1:-}
shift || true
case "$mode" in
    train) exec "$PYTHON" train.py "${PRESET[@]}" "$@" ;;
    eval) exec "$PYTHON" eval.py "${PRESET[@]}" "$@" ;;
    all)
        "$PYTHON" train.py "${PRESET[@]}" "$@"
        exec "$PYTHON" eval.py "${PRESET[@]}" "$@"
        ;;
    *)
        echo "usage: bash $0 {train|eval|all} [flags for train.py / eval.py]" >&2
        exit 2
        ;;
esac
