#!/usr/bin/env bash
# The body of the run_<dataset>_<size>.sh recipes at the repository root:
#   bash scripts/run_recipe.sh <recipe name> <preset file> <preset> train|eval <#processes> [flags]
# runs
#   python scripts/launch.py --standalone --nproc_per_node=<#processes> train.py|eval.py \
#          --config_file <preset file> [--config <preset>] [flags]
# (one process per GPU; 1 on a CPU-only machine). scripts/launch.py is torchrun with the same flags and engine,
# but a process that fails ends the job with one line naming its rank, its message and its exit status (the
# launcher's own log goes to a file named there). The flags go through untouched and come last, so they
# override the preset (a later --config picks another preset of the same file). Before anything starts,
# `train.py|eval.py <the same flags> --check <#processes>` checks once what every process would check alike
# (flags, preset, data folder, checkpoint, processes against GPUs): a mistake is one line, exit 2, and nothing
# is started. PYTHON: the interpreter (default: python on PATH).
set -euo pipefail

recipe=$1 config_file=$2 preset=$3
shift 3
usage="usage: bash $recipe train|eval <#GPUs> [flags for train.py / eval.py]"

mode=${1:-}
case "$mode" in
    train) script=train.py ;;
    eval) script=eval.py ;;
    *) echo "$usage" >&2; exit 2 ;;
esac
nproc=${2:-}
if ! [[ "$nproc" =~ ^[1-9][0-9]*$ ]]; then
    echo "$usage  (<#GPUs> must be a positive integer, got '${nproc}')" >&2
    exit 2
fi

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
preset_flags=()
if [ "$preset" != default ]; then
    preset_flags=(--config "$preset")
fi

export OMP_NUM_THREADS=1
python=${PYTHON:-python}
"$python" "$repo/$script" --config_file "$repo/$config_file" ${preset_flags[@]+"${preset_flags[@]}"} \
    "${@:3}" --check "$nproc" || exit $?
# The launcher runs in the background so that a SIGTERM / SIGUSR1 sent to this script (a scheduler stopping
# the job, `kill`) goes to the training processes, which finish their step, save a checkpoint and exit 0. Sent
# to the launcher itself, it would end the processes at once.
"$python" "$repo/scripts/launch.py" --standalone --nproc_per_node="$nproc" "$repo/$script" \
    --config_file "$repo/$config_file" ${preset_flags[@]+"${preset_flags[@]}"} "${@:3}" &
launcher=$!
forward() { pkill "-$1" -P "$launcher" 2>/dev/null || true; }
trap 'forward TERM' TERM
trap 'forward USR1' USR1
trap 'forward INT' INT
status=0
while true; do
    wait "$launcher" && status=0 || status=$?
    # wait returns early (status > 128) when a trapped signal arrives; keep waiting while torchrun runs
    if kill -0 "$launcher" 2>/dev/null; then continue; fi
    break
done
exit "$status"
