#!/usr/bin/env bash
# Build the image transformer-xl:latest from the repository's Dockerfile (extra flags go to docker build,
# e.g. --build-arg FROM_IMAGE=pytorch/pytorch:<tag>).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
docker build . --network=host --rm -t transformer-xl:latest "$@"
