#!/usr/bin/env bash
# Wheels of what the GPU machine's image lacks, for its Python (3.12, x86-64 manylinux), built here into one folder
# that travels with the source tree (the device tool's `carry`; source tree + wheels must stay under 64 MiB).
#
#   bash scripts/gpu_wheelhouse.sh [out_dir=.whl] [--with-av]
#   # there:  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
#
# The image (docs: ../.library/device/KINDS.md) has torch 2.11, transformers 5.17, safetensors, einops, msgpack, ninja,
# psutil, py-cpuinfo, pyyaml, tqdm, numpy, scipy, pillow, matplotlib, tensorboard and huggingface-hub, but no
# deepspeed (and its pydantic/hjson), omegaconf, webdataset, diffusers or PyAV. transformers travels too, at our pin,
# so both machines run the same text-encoder code. PyAV (~35 MiB) is only needed to decode mp4 shards (the data
# loader benchmark); training from generated data or cached latents does not need it, so it is opt-in.
set -euo pipefail
cd "$(dirname "$0")/.."
out=.whl
with_av=0
for arg in "$@"; do
  case "$arg" in
    --with-av) with_av=1 ;;
    -*) echo "unknown option $arg" >&2; exit 2 ;;
    *) out=$arg ;;
  esac
done
PY=${PYTHON:-python3}
LIMIT_MIB=${LIMIT_MIB:-64}
mkdir -p "$out"
rm -f "$out"/*.whl

# Pure-Python or manylinux wheels straight from the registry, pinned to the versions setup.py and .venv use.
binary=(omegaconf==2.4.0 webdataset==1.0.2 braceexpand==0.1.7 diffusers==0.42.1 transformers==5.24.0
        importlib_metadata==10.2.0 hjson==3.1.0 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0
        typing-inspection==0.4.5)
[ "$with_av" = 1 ] && binary+=(av==18.1.0)
platforms=()
for p in manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_27_x86_64 manylinux_2_28_x86_64 \
         manylinux_2_31_x86_64 manylinux_2_34_x86_64 manylinux_2_35_x86_64; do
  platforms+=(--platform "$p")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d "$out" "${binary[@]}"

# DeepSpeed is published as source only: build a pure-Python wheel here (its ops JIT-compile on the GPU if asked).
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$out" deepspeed==0.19.8

# One version of each package, or pip refuses the whole install there.
dupes=$(ls "$out"/*.whl | xargs -n1 basename | cut -d- -f1 | tr 'A-Z-' 'a-z_' | sort | uniq -d)
if [ -n "$dupes" ]; then
  echo "two versions of: $dupes" >&2; exit 1
fi

wheels_kib=$(du -sk "$out" | cut -f1)
tree_kib=$(git ls-files -z | xargs -0 du -ck 2>/dev/null | tail -1 | cut -f1)
total_mib=$(( (wheels_kib + tree_kib + 1023) / 1024 ))
ls -1 "$out"
echo "wheels $((wheels_kib / 1024)) MiB + source tree $((tree_kib / 1024)) MiB = ${total_mib} MiB (limit ${LIMIT_MIB} MiB)"
if [ "$total_mib" -gt "$LIMIT_MIB" ]; then
  echo "too large to travel: leave out --with-av or ignore more of the tree" >&2; exit 1
fi
