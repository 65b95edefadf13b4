#!/usr/bin/env bash
# The quick start: set up a virtual environment in .venv (Python >= 3.10; torch and requirements.txt are
# installed when missing), then run
#   bash scripts/quickstart.sh demo [flags]    # scripts/demo.py: a small model with and without memory on the
#                                              # built-in corpus, trained and evaluated on the CPU (a few minutes)
#   bash scripts/quickstart.sh test [flags]    # the test suite: python -m pytest -q [flags]
# Environment: PYTHON (the interpreter that creates .venv, default python3), TORCH (the torch requirement
# installed when .venv has no torch, default torch==2.13.0; e.g. TORCH=torch for the newest release).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

usage="usage: bash scripts/quickstart.sh demo|test [flags for scripts/demo.py / pytest]"
mode=${1:-}
case "$mode" in
    demo|test) shift ;;
    *) echo "$usage" >&2; exit 2 ;;
esac

if [ ! -x .venv/bin/python ]; then
    python=${PYTHON:-python3}
    if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
        echo "quickstart: needs Python >= 3.10 as '$python' (found: $("$python" --version 2>&1 || echo none)); set PYTHON=/path/to/python3.X" >&2
        exit 2
    fi
    echo "quickstart: creating the virtual environment .venv with $python"
    if ! "$python" -m venv .venv; then
        rm -rf .venv
        echo "quickstart: '$python -m venv' failed; install the venv module (Debian/Ubuntu: apt-get install python3-venv)" >&2
        exit 1
    fi
fi
. .venv/bin/activate

if ! python -c 'import torch' 2>/dev/null; then
    echo "quickstart: installing ${TORCH:-torch==2.13.0} into .venv"
    python -m pip install -q "${TORCH:-torch==2.13.0}"
fi
python -m pip install -q -r requirements.txt

case "$mode" in
    demo) exec python scripts/demo.py "$@" ;;
    test) exec python -m pytest -q "$@" ;;
esac
