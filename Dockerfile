# The toolkit in the official PyTorch CUDA runtime image (torch with CUDA, cuDNN and NCCL inside; no apex).
#   bash scripts/docker/build.sh          # docker build -t transformer-xl:latest .
#   bash scripts/docker/interactive.sh    # a shell in it with the GPUs and this folder mounted
# Another PyTorch image (any torch >= 2.4): docker build --build-arg FROM_IMAGE=pytorch/pytorch:<tag> ...
ARG FROM_IMAGE=pytorch/pytorch:2.8.0-cuda12.8-cudnn9-runtime
FROM ${FROM_IMAGE}

ENV LANG=C.UTF-8 LC_ALL=C.UTF-8 PYTHONUNBUFFERED=1
WORKDIR /workspace/transformer-xl

# the requirements first, so that the layer is reused while only the code changes; the image's torch
# already satisfies requirements.txt and is kept
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt

COPY . .
