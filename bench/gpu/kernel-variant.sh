#!/usr/bin/env bash
# Builds a variant of a benchmark (or test binary) for experiments: one kernel translation unit recompiled with
# extra nvcc flags (the kernels' experiment macros, e.g. -DATTND_PREFILL_PINGPONG=0) and linked
# ahead of the kernel library, whose copy of that unit the linker then skips. Run from the
# repository root after the build directory has built the benchmark.
#
#   bench/gpu/kernel-variant.sh BUILD_DIR BENCH KERNEL_SOURCE NAME [NVCC_FLAG...]
#   e.g. bench/gpu/kernel-variant.sh build prefill_bench kernels/cuda/prefill/prefill_hopper.cu \
#          nopp -DATTND_PREFILL_PINGPONG=0        # -> build/bench/prefill_bench_nopp
# With ATTND_VARIANT_TREE=DIR (e.g. a `git worktree add --detach DIR OLD_COMMIT`), the unit and
# its headers come from DIR: an older kernel timed in the same run as the current one (its
# launcher's signature must be the current one's).
set -euo pipefail
[ $# -ge 4 ] || { sed -n 2,10p "$0"; exit 2; }
build=$1 bench=$2 src=$3 name=$4
shift 4
root=$PWD
mkdir -p "$build/variants"
obj=$root/$build/variants/$name.o
# The unit's compile command as the build runs it, with the flags added and the output renamed.
compile=$(ninja -C "$build" -t commands "$bench" | grep -F -- "-c $root/$src " | head -1)
[ -n "$compile" ] || { echo "no compile command for $src in $bench's build" >&2; exit 1; }
compile=$(sed -E "s# -MD -MT [^ ]+ -MF [^ ]+##; s# -o [^ ]+\.o\$# -o $obj#" <<<"$compile")
if [ -n "${ATTND_VARIANT_TREE:-}" ]; then
  tree=$(cd "$ATTND_VARIANT_TREE" && pwd)
  compile=$(sed -E "s#-I$root/kernels/cuda/\.\./\.\.#-I$tree#; s#-I$root( |\$)#-I$tree\1#; s#-c $root/$src #-c $tree/$src #" <<<"$compile")
fi
(cd "$build" && eval "$compile $*")
# The target's link command with the variant object first (any executable target: a
# benchmark, or a test binary such as cuda_kernels_test).
link=$(ninja -C "$build" -t commands "$bench" | tail -1 | sed 's/^: && //; s/ && :$//')
out=$(grep -oE " -o [^ ]+" <<<"$link" | tail -1 | cut -c5-)
main_obj=$(grep -oE "$(dirname "$out")/CMakeFiles/$bench\.dir/[^ ]+\.o" <<<"$link" | head -1)
link=${link/$main_obj/$main_obj $obj}
link=${link/-o $out /-o ${out}_$name }
(cd "$build" && eval "$link")
echo "$build/${out}_$name"
