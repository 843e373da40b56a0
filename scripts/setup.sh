#!/usr/bin/env bash
# Installs every Debian 12 package attnd's build, tests and demo need, if any is missing.
# CUDA (nvcc) is optional and not installed here: with it on PATH the CUDA code is built too.
set -euo pipefail

packages=(
  build-essential cmake ninja-build pkg-config
  protobuf-compiler libprotobuf-dev protobuf-compiler-grpc libgrpc++-dev
  libabsl-dev libspdlog-dev libfmt-dev prometheus-cpp-dev libssl-dev
  libgtest-dev libgmock-dev libbenchmark-dev
  curl procps python3 python3-venv
  # scripts/fuzz.sh (ctest request_fuzzer_60s): clang 14 with libFuzzer and the sanitizer
  # runtimes (libclang-rt-14-dev, not pulled in by clang without recommends), and
  # llvm-symbolizer (llvm-14) for readable crash reports.
  clang libclang-rt-14-dev llvm-14
  openssl  # the e2e tests make throwaway TLS certificates with its CLI
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi

echo "setup: installing ${missing[*]}" >&2
sudo=""
if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -q
$sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
