#!/usr/bin/env bash
# Creates .venv and installs keras-zoo with all three backends and the test tools.
# torch is installed first and pinned: any other version pulls several GB of CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install --quiet --disable-pip-version-check torch==2.13.0
.venv/bin/pip install --quiet --disable-pip-version-check -e ".[all]"
