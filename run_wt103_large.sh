#!/usr/bin/env bash
# Transformer-XL large on WikiText-103 (the reference's recipe; presets per system in the file, e.g. --config dgxa100_8gpu_fp16).
#   bash run_wt103_large.sh train <#GPUs> [train.py flags]    e.g. --max_step 1000 --work_dir LM-TFM
#   bash run_wt103_large.sh eval  <#GPUs> [eval.py flags]     e.g. --model LM-TFM/checkpoint_best.pt
# = torchrun --standalone --nproc_per_node=<#GPUs> train.py|eval.py --config_file configs/wt103_large.yaml [flags]
exec bash "$(dirname "${BASH_SOURCE[0]}")/scripts/run_recipe.sh" "$(basename "$0")" configs/wt103_large.yaml default "$@"
