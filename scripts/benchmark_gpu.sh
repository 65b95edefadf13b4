#!/usr/bin/env bash
# The GPU training benchmarks of README.md ("Performance"), one GPU, synthetic data with WikiText-103's
# token frequencies (no corpus needed).
#
#   bash scripts/benchmark_gpu.sh [STEPS]
#
# Writes benchmarks/results/<gpu-name>/: one raw log per configuration (<name>.log), every result as a JSON
# line (results.jsonl), and the machine (environment.txt). A configuration that fails is logged and the
# others still run. STEPS timed steps per configuration (default 50), after 10 warm-up steps.
set -uo pipefail
cd "$(dirname "$0")/.."

steps=${1:-50}
gpu=$(python -c "import torch; assert torch.cuda.is_available(), 'no GPU'; print(torch.cuda.get_device_name(0))") || exit 1
dir="benchmarks/results/$(echo "$gpu" | tr 'A-Z ' 'a-z-' | tr -cd 'a-z0-9-')"
mkdir -p "$dir"
{ date -u; nvidia-smi; python -m torch.utils.collect_env; git log -1 --format='commit %H'; } > "$dir/environment.txt" 2>&1

failed=0
run() {
    local name=$1
    shift
    echo "== $name: $*"
    if ! python scripts/benchmark_train.py --steps "$steps" --warmup 10 --json "$dir/results.jsonl" "$@" \
            > "$dir/$name.log" 2>&1; then
        echo "   FAILED (see $dir/$name.log)"
        failed=$((failed + 1))
    fi
    tail -n 1 "$dir/$name.log"
}

# base (16 layers, d_model 512, tgt = mem = 192): batch 32 per GPU, as the reference's published figures
run base_bf16                 --preset base --batch_size 32 --precision bf16
run base_bf16_cuda_graphs     --preset base --batch_size 32 --precision bf16 --cuda_graphs
run base_bf16_flex            --preset base --batch_size 32 --precision bf16 --attn_impl flex
run base_bf16_flex_graphs     --preset base --batch_size 32 --precision bf16 --attn_impl flex --cuda_graphs
run base_bf16_math            --preset base --batch_size 32 --precision bf16 --attn_impl math
run base_bf16_eager           --preset base --batch_size 32 --precision bf16 --no-compile
run base_bf16_eager_math      --preset base --batch_size 32 --precision bf16 --no-compile --attn_impl math
run base_bf16_checkpointing   --preset base --batch_size 32 --precision bf16 --checkpoint_activations
run base_fp16                 --preset base --batch_size 32 --precision fp16
run base_tf32                 --preset base --batch_size 32 --precision tf32
run base_fp32                 --preset base --batch_size 32 --precision fp32
# large (18 layers, d_model 1024, tgt = mem = 384): batch 16 per GPU (the reference's 128 on 8 GPUs)
run large_bf16                --preset large --batch_size 16 --precision bf16
run large_bf16_cuda_graphs    --preset large --batch_size 16 --precision bf16 --cuda_graphs
run large_bf16_checkpointing  --preset large --batch_size 16 --precision bf16 --checkpoint_activations
run large_bf16_eager          --preset large --batch_size 16 --precision bf16 --no-compile
run large_fp16                --preset large --batch_size 16 --precision fp16
# the CPU preset on the GPU, for reference
run cpu_small_bf16            --preset cpu_small --precision bf16

echo "results in $dir ($failed failed)"
exit $((failed > 0))
