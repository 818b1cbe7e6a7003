#!/usr/bin/env bash
# Runs the whole test suite once per Keras backend, one process each; fails if any backend fails.
#   bash scripts/test.sh                      every backend
#   bash scripts/test.sh torch [jax]          those backends only
#   bash scripts/test.sh jax -k lora -x       the arguments after the backends go to pytest
set -uo pipefail
cd "$(dirname "$0")/.."
backends=()
while [ $# -gt 0 ] && [[ "$1" =~ ^(jax|torch|tensorflow)$ ]]; do
  backends+=("$1")
  shift
done
[ ${#backends[@]} -eq 0 ] && backends=(jax torch tensorflow)
status=0
for backend in "${backends[@]}"; do
  echo "=== KERAS_BACKEND=$backend"
  KERAS_BACKEND=$backend .venv/bin/python -m pytest -q -p no:cacheprovider "$@" || status=1
done
exit $status
