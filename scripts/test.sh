#!/usr/bin/env bash
# Runs the whole test suite once per Keras backend, one process each; fails if any backend fails.
set -uo pipefail
cd "$(dirname "$0")/.."
status=0
for backend in jax torch tensorflow; do
  echo "=== KERAS_BACKEND=$backend"
  KERAS_BACKEND=$backend .venv/bin/python -m pytest -q -p no:cacheprovider "$@" || status=1
done
exit $status
