#!/usr/bin/env bash
# A base-size model on WikiText-2 (no reference recipe; an untuned starting point).
#   bash run_wt2_base.sh train <#GPUs> [train.py flags]    e.g. --max_step 1000 --work_dir LM-TFM
#   bash run_wt2_base.sh eval  <#GPUs> [eval.py flags]     e.g. --model LM-TFM/checkpoint_best.pt
# = torchrun --standalone --nproc_per_node=<#GPUs> train.py|eval.py --config_file configs/wt2.yaml [flags]
exec bash "$(dirname "${BASH_SOURCE[0]}")/scripts/run_recipe.sh" "$(basename "$0")" configs/wt2.yaml default "$@"
