#!/usr/bin/env bash
# Download the datasets into data/<name>/ (see scripts/getdata.py --help):
#   ./getdata.sh                 all of wt2 wt103 ptb enwik8 text8 lm1b
#   ./getdata.sh wt2 ptb         some of them
#   ./getdata.sh --mirror URL    from a local mirror (file:// or http://) instead of the public sources
# The interpreter: $PYTHON when set, else .venv's when it exists and no virtual environment is active, else
# python3 (the standard library is enough).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [ -n "${PYTHON:-}" ]; then
    python="$PYTHON"
elif [ -x "$here/.venv/bin/python" ] && [ -z "${VIRTUAL_ENV:-}" ]; then
    python="$here/.venv/bin/python"
else
    python=python3
fi
exec "$python" "$here/scripts/getdata.py" "$@"
