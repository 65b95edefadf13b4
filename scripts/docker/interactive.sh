#!/usr/bin/env bash
# A shell in transformer-xl:latest with all GPUs, the host network and this repository mounted at
# /workspace/transformer-xl (so data/ and LM-TFM/ written inside stay on the host).
#   bash scripts/docker/interactive.sh              # bash
#   bash scripts/docker/interactive.sh <command>    # run a command instead, e.g. bash run_wt103_base.sh train 8
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
docker run --gpus all --init -it --rm --network=host --ipc=host \
    -v "$PWD":/workspace/transformer-xl transformer-xl:latest "${@:-bash}"
