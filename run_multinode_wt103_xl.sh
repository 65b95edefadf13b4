#!/bin/bash
# Transformer-XL XL (~1.4B parameters, configs/wt103_xl.yaml) on WikiText-103 with tensor parallelism, over nodes.
#
#   bash run_multinode_wt103_xl.sh {train|eval|all} [flags for train.py / eval.py]
#
# Runs ONE process; start it once per GPU: Slurm's srun does (see run.sub: `sbatch -N 8 run.sub all`), and so
# does any launcher that sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT (torchrun). Without a
# launcher it refuses --tensor_parallel 8 (one line). The preset is 2dgxa100_8gpu_tp8: 2 nodes of 8 GPUs, TP 8
# inside each node x DP 2 across them; `--config default` is TP 4 on one node. Later flags override earlier
# ones. In `all` mode the extra flags go to both train.py and eval.py, so they must be flags that both accept
# (eval.py evaluates the full-tensor checkpoint in one process per GPU, without tensor parallelism).
#   SCRIPT=run_multinode_wt103_xl.sh sbatch -N 2 --ntasks-per-node 8 --gpus-per-node 8 run.sub all
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
PYTHON=${PYTHON:-python}
PRESET=(--config_file wt103_xl.yaml --config 2dgxa100_8gpu_tp8)

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
