#!/usr/bin/env bash
# Transformer-XL base on text8, reported in bits per character (the reference's legacy recipe).
#   bash run_text8_base.sh train <#GPUs> [train.py flags]    e.g. --max_step 1000 --work_dir LM-TFM
#   bash run_text8_base.sh eval  <#GPUs> [eval.py flags]     e.g. --model LM-TFM/checkpoint_best.pt
# = torchrun --standalone --nproc_per_node=<#GPUs> train.py|eval.py --config_file configs/text8.yaml [flags]
exec bash "$(dirname "${BASH_SOURCE[0]}")/scripts/run_recipe.sh" "$(basename "$0")" configs/text8.yaml default "$@"
