#!/usr/bin/env bash
# The GPU checks and benchmarks in one go (what a CPU-only CI cannot run), most valuable first, each step time-boxed
# (its whole process group is killed at the limit) and writing its own JSON to $1 (default runs/gpu_suite), all
# stderr to $1/stderr.log, the trainings' logs and metrics to $1/train_logs.tgz:
#   check_cuda   numerical checks on CUDA (SSVAE golden file fp32/bf16, our DiT vs diffusers')
#   dit_train    CogVideoX-2B on SSVAE latents under the deepspeed launcher, bf16, ZeRO-2: step time, tokens/s, peak
#                memory, MFU, the top operators of its last 3 steps (torch.profiler: where the engine's time goes);
#                then checkpoint + resume compared step by step on a 2-layer model of the same width
#   vae_train    the released stage-1 SSVAE (315M), 17x256, bf16, ZeRO-2, LPIPS + LCR + LMR, PatchGAN from step 10,
#                30 steps at the full learning rate (the recipe's 1000-step warm-up would hold it near 2e-6),
#                checkpoint at 20 and resume compared with the uninterrupted run
#   dit_2b       the bare-model DiT benchmark at the same size (the engine's overhead is the difference)
#   data_loader  decoding throughput of 17x256 clips from the mp4 shards vae_train made (needs PyAV)
#   vae_17x256 / vae_49x512 (+ _contiguous)  the VAE inference benchmarks (only when named in STEPS)
# The default steps' boxes sum to 570 s, under the device tool's 600 s per command; the H200 (2026-12-04) took
# 18 s, ~260 s, ~190 s, 29 s and 7 s for them (each training launch costs 40-45 s of start-up there).
# The trainings need the wheels of scripts/gpu_wheelhouse.sh installed (deepspeed, omegaconf, webdataset, diffusers,
# PyAV). Both use torch's fused AdamW kernel (deepspeed.fused_optimizer=torch, the GPU default since 2026-12-04; the
# first H200 figures were with =no, torch's multi-tensor kernel): DeepSpeed's FusedAdam would JIT-compile first.
#   bash bench/gpu_suite.sh [out_dir] [golden.safetensors]
#   STEPS="check_cuda dit_2b" bash bench/gpu_suite.sh    # a subset
#   SCALE=tiny STEPS="vae_train dit_train" bash bench/gpu_suite.sh    # CPU dry run of the trainings at tiny sizes
set -u -o pipefail
out=${1:-runs/gpu_suite}
golden=${2:-../shared/reference/ssvae_golden_tiny.safetensors}
py=${PYTHON:-python3}
work=${WORK:-/tmp/gpu_suite_train}
default_steps="check_cuda dit_train vae_train dit_2b data_loader"
steps=" ${STEPS:-$default_steps} "
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
step() {  # name, seconds, command...
  local name=$1 limit=$2; shift 2
  [[ "$steps" != *" $name "* ]] && return
  local start=$SECONDS
  timeout -k 10 "$limit" "$@" > "$out/$name.json" 2>> "$out/stderr.log"
  echo "$name: exit $? in $((SECONDS - start)) s" | tee -a "$out/stderr.log"
}
vae_scale=released; dit_scale=2b; vae_size=256; vae_frames=17
[ "${SCALE:-}" = tiny ] && vae_scale=tiny && dit_scale=tiny && vae_size=64 && vae_frames=9
step check_cuda 40 $py -m bench.check_cuda --golden "$golden"
step dit_train 260 $py -m bench.bench_train_engine --task dit --scale $dit_scale --steps 10 --save-at 6 --profile 3 \
  --resume-layers 2 --work "$work" model.gradient_checkpointing=false deepspeed.fused_optimizer=${FUSED:-torch}
step vae_train 200 $py -m bench.bench_train_engine --task vae --scale $vae_scale --steps 30 --save-at 20 \
  --work "$work" deepspeed.fused_optimizer=${FUSED:-torch} optimizer.warmup_steps=0 disc_optimizer.warmup_steps=0
step dit_2b 50 $py -m bench.bench_dit --size 2b --steps 5 --impl ours
step data_loader 20 $py -m bench.bench_data "$work/vae_$vae_scale/data" --frames $vae_frames --size $vae_size --repeats 1
step vae_17x256 240 $py -m bench.bench_vae --repeats 3
step vae_17x256_contiguous 90 $py -m bench.bench_vae --repeats 3 --models ssvae --memory-format contiguous
step vae_49x512 240 $py -m bench.bench_vae --frames 49 --size 512 --models ssvae,wan2.2
step vae_49x512_contiguous 120 $py -m bench.bench_vae --frames 49 --size 512 --models ssvae --memory-format contiguous
[ -d "$work" ] && (cd "$work" && find . \( -name train.log -o -name metrics.jsonl \) -print0 |
  tar czf - --null -T -) > "$out/train_logs.tgz"
exit 0
