#!/bin/bash
# run from anywhere in a checkout; the "before" code is a detached worktree of 5a0b490 (main before issue 18):
#   git worktree add --detach /tmp/base18s 5a0b490
# before/after of issue 18's step-time acceptance item, alternated (scripts/benchmark_ab.py): eager and
# --compile, 2 threads and 1; with REF set to the reference's pytorch/ folder (a checkout of NVIDIA
# DeepLearningExamples, PyTorch/LanguageModeling/Transformer-XL/pytorch), the reference trainer's step
# (scripts/benchmark_reference_train.py, float32 eager: it has no compiled mode) runs in the same rounds,
# twice: as it ships ("reference") and with our trainer's process settings ("reference_our_settings": glibc
# malloc's reuse of freed memory and the OpenMP spin-wait bound); both with the JIT profiling executor off,
# as the current reference's train.py sets it
[ -z "${REF:-}" ] || REF=$(cd "$REF" && pwd) || exit 1
[ -z "${BASE:-}" ] || BASE=$(cd "$BASE" && pwd) || exit 1
cd "$(git -C "$(dirname "$0")" rev-parse --show-toplevel)"
BASE=${BASE:-/tmp/base18s}        # the checkout of 5a0b490
R=benchmarks/results/training/cpu/issue18/step_time
mkdir -p $R
M="--n_layer 4 --d_model 256 --n_head 4 --d_head 64 --d_inner 1024 --tgt_len 64 --mem_len 64 --eval_tgt_len 64 --no_cuda"
F="--preset base --batch_size 8 --steps 6 --warmup 2 -- $M"
REF2=() REF1=()                   # the reference's commands for benchmark_ab.py, none without REF
if [ -n "${REF:-}" ]; then
  RB="python scripts/benchmark_reference_train.py --reference $(printf %q "$REF") --jit_profiling off"
  REF2=(--cmd "reference=$RB $F" --cmd "reference_our_settings=$RB --our_process_settings $F")
  REF1=(--cmd "reference=OMP_NUM_THREADS=1 $RB $F"
        --cmd "reference_our_settings=OMP_NUM_THREADS=1 $RB --our_process_settings $F")
fi
uptime > $R/eager_2threads.txt
python scripts/benchmark_ab.py --runs 5 --log_dir $R/eager_2threads \
  --cmd "before=python scripts/benchmark_train.py --repo $BASE $F" \
  --cmd "after=python scripts/benchmark_train.py $F" "${REF2[@]}" >> $R/eager_2threads.txt 2>&1
uptime >> $R/eager_2threads.txt
uptime > $R/eager_1thread.txt
python scripts/benchmark_ab.py --runs 3 --log_dir $R/eager_1thread \
  --cmd "before=OMP_NUM_THREADS=1 python scripts/benchmark_train.py --repo $BASE $F" \
  --cmd "after=OMP_NUM_THREADS=1 python scripts/benchmark_train.py $F" "${REF1[@]}" >> $R/eager_1thread.txt 2>&1
uptime >> $R/eager_1thread.txt
FC="--preset base --batch_size 8 --steps 6 --warmup 2 --compile -- $M"
uptime > $R/compiled_2threads.txt
python scripts/benchmark_ab.py --runs ${COMPILED_RUNS:-3} --log_dir $R/compiled_2threads \
  --cmd "before=python scripts/benchmark_train.py --repo $BASE $FC" \
  --cmd "after=python scripts/benchmark_train.py $FC" "${REF2[@]}" >> $R/compiled_2threads.txt 2>&1
uptime >> $R/compiled_2threads.txt
uptime > $R/compiled_1thread.txt
python scripts/benchmark_ab.py --runs ${COMPILED_RUNS:-3} --log_dir $R/compiled_1thread \
  --cmd "before=OMP_NUM_THREADS=1 python scripts/benchmark_train.py --repo $BASE $FC" \
  --cmd "after=OMP_NUM_THREADS=1 python scripts/benchmark_train.py $FC" "${REF1[@]}" >> $R/compiled_1thread.txt 2>&1
uptime >> $R/compiled_1thread.txt
