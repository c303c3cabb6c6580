#!/usr/bin/env bash
# Installs the package and its dependencies into the current Python environment.
# torch goes first, pinned and through pip: 2.13.0 is the CPU build these machines hold on disk (pip's
# configuration points at it; uv does not look there), while an unpinned torch requirement with no torch installed
# pulls a multi-GB CUDA build. Set LFZH_TORCH to another requirement (for example "torch==2.13.0" from a CUDA index)
# on GPU machines.
# The rest goes through uv when it can be installed (measured on a fresh virtualenv, 2026-12-03: 21 s where pip took
# 2-3.5 min for the same packages, most of it resolving and building jieba's and jionlp's source distributions);
# LFZH_INSTALLER=pip, or no uv on the package index, installs with pip.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
PY="$("$PY" -c 'import sys; print(sys.executable)')"  # uv takes a system interpreter only by its full path
EXTRAS="${1:-test}"
pip_install() { "$PY" -m pip install -q --disable-pip-version-check "$@"; }
pip_install "${LFZH_TORCH:-torch==2.13.0}"
if [ "${LFZH_INSTALLER:-uv}" = uv ] && pip_install uv; then
  "$PY" -m uv pip install -q --python "$PY" -e ".[${EXTRAS}]"
else
  pip_install -e ".[${EXTRAS}]"
fi
