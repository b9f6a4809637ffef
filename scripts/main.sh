#!/usr/bin/env bash
# Set up .venv and run the main job: the tiny end-to-end pipeline on the embedded default data and real footage
# (generate data, train a tiny SSVAE with the deepspeed launcher, reconstruct real clips, train a tiny text-to-video
# DiT on its latents, sample and score videos). Outputs go to runs/pipeline/. Extra arguments are key=value overrides.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh dev,megatron
exec .venv/bin/python -m tools.pipeline --config configs/pipeline/tiny.yaml "$@"
