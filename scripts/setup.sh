#!/usr/bin/env bash
# Installs the Debian 12 packages attnd needs, if any is missing.
#   scripts/setup.sh          everything: the build, the tests, the demo, the images' test
#   scripts/setup.sh build    only what building attnd and attnctl needs (the image's build stage)
#   scripts/setup.sh image    only what scripts/image.sh needs on the host
# CUDA (nvcc) is optional and not installed here: with it on PATH the CUDA code is built too.
set -euo pipefail

build=(
  build-essential cmake ninja-build pkg-config
  protobuf-compiler libprotobuf-dev protobuf-compiler-grpc libgrpc++-dev
  libabsl-dev libspdlog-dev libfmt-dev prometheus-cpp-dev libssl-dev
  libucx-dev  # KV transfer between attnd processes (server/transport)
)
tests=(
  libgtest-dev libgmock-dev libbenchmark-dev
  curl procps python3 python3-venv
  # scripts/fuzz.sh (ctest request_fuzzer_60s): clang 14 with libFuzzer and the sanitizer
  # runtimes (libclang-rt-14-dev, not pulled in by clang without recommends), and
  # llvm-symbolizer (llvm-14) for readable crash reports.
  clang libclang-rt-14-dev llvm-14
  openssl  # the e2e tests make throwaway TLS certificates with its CLI
  python3-yaml  # tests/deploy: the manifests are read as YAML
)
image=(
  # scripts/image.sh: Debian's Docker (dockerd with BuildKit), debootstrap for the base image
  # (no image registry is assumed), pip in a venv to fetch the CUDA wheels on the host, and
  # setpriv (util-linux) to run the demo client under the image's uid.
  docker.io debootstrap python3 python3-venv util-linux curl
)

case "${1:-all}" in
  build) packages=("${build[@]}") ;;
  image) packages=("${image[@]}") ;;
  all) packages=("${build[@]}" "${tests[@]}" "${image[@]}") ;;
  *) echo "usage: setup.sh [all|build|image]" >&2; exit 2 ;;
esac

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
