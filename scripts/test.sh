#!/usr/bin/env bash
# The test command: installs what is missing, builds everything, runs every test through ctest.
# GPU tests skip themselves on a machine without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/build.sh
ctest --test-dir "${ATTND_BUILD_DIR:-build}" --output-on-failure -j "$(nproc)" --timeout 600
