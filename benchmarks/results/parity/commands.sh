#!/bin/bash
# Our training step against the reference trainer's, step by step (scripts/compare_reference_train.py), from
# the same weights on the same batches. REF: the reference's pytorch/ folder (a checkout of NVIDIA
# DeepLearningExamples, PyTorch/LanguageModeling/Transformer-XL/pytorch). One file per configuration.
[ -n "${REF:-}" ] || { echo "set REF to the reference's pytorch/ folder" >&2; exit 2; }
REF=$(cd "$REF" && pwd) || exit 1
cd "$(git -C "$(dirname "$0")" rev-parse --show-toplevel)"
R=benchmarks/results/parity
M="--n_layer 2 --d_model 256 --n_head 4 --d_head 64 --d_inner 1024 --tgt_len 64 --mem_len 64 --eval_tgt_len 64 --no_cuda"
C="python scripts/compare_reference_train.py --reference $(printf %q "$REF") --preset base --batch_size 8 --steps 4"
run() {   # name, then the command's flags
  local name=$1; shift
  { echo "\$ $C $*"; $C "$@" 2>&1; echo "# exit $?"; } > $R/$name.txt
}
run float64_attn0_dropout --float64 -- $M --optim lamb
run float64_attn1_dropatt --float64 -- $M --optim lamb --attn_type 1 --dropatt 0.1
run float64_div_val4 --float64 -- $M --optim lamb --div_val 4
run float64_pre_lnorm_2chunks --float64 -- $M --optim lamb --pre_lnorm --batch_chunk 2
run float64_div_val4_compiled --float64 --compile -- $M --optim lamb --div_val 4
run float64_div_val4_untied --float64 -- $M --optim lamb --div_val 4 --not_tied
run float64_jitlamb --float64 -- $M
run float32_jitlamb --  $M
run float32_jitlamb_compiled --compile -- $M
run float64_attn2_reference_memory_bug --float64 -- $M --optim lamb --attn_type 2
