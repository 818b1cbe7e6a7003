#!/usr/bin/env bash
# Runs the whole test suite once per Keras backend, one process each; fails if any backend fails.
#   bash scripts/test.sh                      every backend
#   bash scripts/test.sh torch [jax]          those backends only
#   bash scripts/test.sh jax -k lora -x       the arguments after the backends go to pytest
# With several backends, two run at once (ZOO_TEST_JOBS=1 runs them one after another): a run keeps about one
# core busy, so on two cores the first backend runs beside the others, each in its own process and temporary
# folder. A backend's output is printed whole when it ends.
set -uo pipefail
cd "$(dirname "$0")/.."
backends=()
while [ $# -gt 0 ] && [[ "$1" =~ ^(jax|torch|tensorflow)$ ]]; do
  backends+=("$1")
  shift
done
[ ${#backends[@]} -eq 0 ] && backends=(jax torch tensorflow)

run() {  # run BACKEND [pytest args]
  local backend=$1
  shift
  KERAS_BACKEND=$backend .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
}

if [ "${ZOO_TEST_JOBS:-2}" -le 1 ] || [ ${#backends[@]} -eq 1 ]; then
  status=0
  for backend in "${backends[@]}"; do
    echo "=== KERAS_BACKEND=$backend"
    run "$backend" "$@" || status=1
  done
  exit $status
fi

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
trap 'trap - INT TERM; kill 0' INT TERM  # both lanes stop with the script
lane() {  # lane BACKEND... -- [pytest args]: the backends one after another, each printed whole when it ends
  local mine=() backend
  while [ "$1" != "--" ]; do mine+=("$1"); shift; done
  shift
  for backend in "${mine[@]}"; do
    run "$backend" --basetemp="$scratch/$backend" "$@" > "$scratch/$backend.log" 2>&1
    echo $? > "$scratch/$backend.status"
    (flock 9; echo "=== KERAS_BACKEND=$backend"; cat "$scratch/$backend.log") 9> "$scratch/print.lock"
  done
}
lane "${backends[0]}" -- "$@" &
lane "${backends[@]:1}" -- "$@" &
wait  # (a signal's trap runs at once while the script waits here)
status=0
for backend in "${backends[@]}"; do
  [ "$(cat "$scratch/$backend.status" 2>/dev/null)" = 0 ] || status=1
done
exit $status
