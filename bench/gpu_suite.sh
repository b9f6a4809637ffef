#!/usr/bin/env bash
# The GPU checks and benchmarks in one go (what a CPU-only CI cannot run): numerical checks on CUDA, the VAE
# benchmark in bf16 (SSVAE in both conv layouts, Wan 2.2 and CogVideoX side by side), the DiT benchmark at
# CogVideoX-2B size (ours vs diffusers, MFU). Each step is time-boxed; one JSON per step goes to $1 (default
# runs/gpu_suite), all stderr to $1/stderr.log.
#   bash bench/gpu_suite.sh [out_dir] [golden.safetensors]
#   STEPS="check_cuda dit_2b" bash bench/gpu_suite.sh    # a subset
set -u -o pipefail
out=${1:-runs/gpu_suite}
golden=${2:-../shared/reference/ssvae_golden_tiny.safetensors}
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
step() {  # name, seconds, command...
  local name=$1 limit=$2; shift 2
  [[ -n "${STEPS:-}" && " $STEPS " != *" $name "* ]] && return
  local start=$SECONDS
  timeout "$limit" "$@" > "$out/$name.json" 2>> "$out/stderr.log"
  echo "$name: exit $? in $((SECONDS - start)) s" | tee -a "$out/stderr.log"
}
step check_cuda 120 $py -m bench.check_cuda --golden "$golden"
step vae_17x256 240 $py -m bench.bench_vae --repeats 3
step vae_17x256_contiguous 90 $py -m bench.bench_vae --repeats 3 --models ssvae --memory-format contiguous
step vae_49x512 240 $py -m bench.bench_vae --frames 49 --size 512 --models ssvae,wan2.2
step vae_49x512_contiguous 120 $py -m bench.bench_vae --frames 49 --size 512 --models ssvae --memory-format contiguous
step dit_2b 180 $py -m bench.bench_dit --size 2b --steps 5
