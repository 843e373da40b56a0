#!/usr/bin/env bash
# Configures and builds attnd into ${ATTND_BUILD_DIR:-build}. Extra arguments go to ninja
# (targets). CUDA code is built when nvcc is found (override: ATTND_CUDA=ON|OFF).
set -euo pipefail
cd "$(dirname "$0")/.."
build=${ATTND_BUILD_DIR:-build}
if ! command -v nvcc >/dev/null && [ -x /usr/local/cuda/bin/nvcc ]; then
  export PATH=/usr/local/cuda/bin:$PATH
fi
cuda_flag=()
if [ -n "${ATTND_CUDA:-}" ]; then cuda_flag=(-DATTND_CUDA="$ATTND_CUDA"); fi
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE="${CMAKE_BUILD_TYPE:-Release}" "${cuda_flag[@]}" >/dev/null
ninja -C "$build" "$@"
