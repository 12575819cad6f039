#!/usr/bin/env bash
# Download the wheels benchmarks/gpu_check.sh installs on a GPU machine that reaches no
# package index.
#
#     bash benchmarks/gpu_wheels.sh [DIR]        # default DIR: .whl (git-ignored)
#
# The target machine's image (Python 3.12, x86-64, CUDA 13) already holds torch, triton,
# tokenizers, huggingface-hub, safetensors, accelerate, sentencepiece, protobuf, numpy,
# Pillow, aiohttp, prometheus-client, nvidia-ml-py, tqdm, typer, zipp and pygments. What
# gfdit and its GPU tests need beyond that is pinned below, at the versions the CPU test
# suite runs with; transformers and regex are carried too, since the image's are older
# than what the CPU suite runs with. No dependency resolution happens here (--no-deps):
# each wheel is named. Together they are about 25 MB, well inside what travels with the
# working tree (64 MiB with the repository).
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${1:-.whl}"
mkdir -p "$dir"

wheels=(
    diffusers==0.42.1
    transformers==5.24.0
    importlib_metadata==10.2.0
    regex==2026.11.19
    msgspec==0.23.0
    xformers==0.0.35
    pytest==9.2.0
    pluggy==1.7.0
    iniconfig==2.3.1
    pytest-asyncio==1.5.0
    pytest-timeout==2.4.0
)

platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
           manylinux1_x86_64; do
    platforms+=(--platform "$tag")
done

for wheel in "${wheels[@]}"; do
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${platforms[@]}" --dest "$dir" "$wheel"
done
ls -l "$dir"
du -sh "$dir"
