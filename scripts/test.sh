#!/usr/bin/env bash
# Set up .venv and run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh dev,megatron  # megatron: the tensor-parallel tests run against megatron-core too
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
# Two pytest workers, each taking whole test files (their module fixtures are made once): on 2 CPU cores the suite
# took 13 min 29 s against 18 min 03 s serially (2026-12-07), as many tests wait on process start-up and checkpoint
# I/O more than on the CPU. TEST_WORKERS=0 runs it serially; later -n arguments override.
exec .venv/bin/python -m pytest -q -ra -n "${TEST_WORKERS:-2}" --dist loadfile "$@" tests
