#!/usr/bin/env bash
# Installs the package and its dependencies into the current Python environment.
# torch goes first and pinned: 2.13.0 is the CPU build these machines hold on disk, while an
# unpinned torch requirement with no torch installed pulls a multi-GB CUDA build.
# Set LFZH_TORCH to another requirement (for example "torch==2.13.0" from a CUDA index) on GPU machines.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
EXTRAS="${1:-test}"
"$PY" -m pip install -q --disable-pip-version-check "${LFZH_TORCH:-torch==2.13.0}"
"$PY" -m pip install -q --disable-pip-version-check -e ".[${EXTRAS}]"
