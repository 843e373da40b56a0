#!/usr/bin/env bash
# Builds request_fuzzer (tests/fuzz: libFuzzer over request parsing and validation, attnd's
# libraries under ASan + UBSan) with clang in its own build directory, then fuzzes for SECONDS
# (default 60) starting from a copy of the seed corpus tests/fuzz/corpus.
#
#   scripts/fuzz.sh [SECONDS]
#
# Fails on any crash, sanitizer report, leak or hang the fuzzer finds; the input that did it is
# kept in $ATTND_FUZZ_BUILD_DIR/fuzz-artifacts/ (replay: request_fuzzer FILE). Also fails when
# the checked-in corpus is not what make_corpus.cc writes (rewrite it with
# `$ATTND_FUZZ_BUILD_DIR/tests/fuzz/request_fuzzer_corpus tests/fuzz/corpus`).
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-60}
build=${ATTND_FUZZ_BUILD_DIR:-build-fuzz}

# Debian 12's clang is clang 14; scripts/setup.sh installs it with libFuzzer (libclang-rt-14-dev).
CC=${ATTND_FUZZ_CC:-clang} CXX=${ATTND_FUZZ_CXX:-clang++} cmake -S . -B "$build" -G Ninja \
  -DCMAKE_BUILD_TYPE=RelWithDebInfo -DATTND_FUZZ=ON -DATTND_CUDA=OFF \
  -DATTND_BUILD_TESTS=OFF -DATTND_BUILD_BENCH=OFF >/dev/null
ninja -C "$build" request_fuzzer request_fuzzer_corpus

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/seeds" "$work/corpus"
"$build/tests/fuzz/request_fuzzer_corpus" "$work/seeds"
if ! diff -r tests/fuzz/corpus "$work/seeds" >/dev/null; then
  echo "fuzz: tests/fuzz/corpus differs from what make_corpus.cc writes; rewrite it with" >&2
  echo "  $build/tests/fuzz/request_fuzzer_corpus tests/fuzz/corpus" >&2
  exit 1
fi

artifacts="$build/fuzz-artifacts"
mkdir -p "$artifacts"
cp tests/fuzz/corpus/* "$work/corpus/"
if command -v llvm-symbolizer-14 >/dev/null; then
  export ASAN_SYMBOLIZER_PATH=${ASAN_SYMBOLIZER_PATH:-$(command -v llvm-symbolizer-14)}
fi
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1}
# -timeout: one request against a 2-layer model takes milliseconds; seconds means a hang.
"$build/tests/fuzz/request_fuzzer" -max_total_time="$seconds" -max_len=4096 -timeout=30 \
  -print_final_stats=1 -artifact_prefix="$artifacts/" "$work/corpus"
