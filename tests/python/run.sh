#!/usr/bin/env bash
# The Python client end to end: a virtualenv (made once under the build directory from
# client/python/requirements.txt), the package installed into it from client/python with pip
# (as a user would: pyproject.toml, stubs generated at build time), then against a real attnd
# on a Unix socket: the client's tests (the native ones through libattnd_c.so) and example.py,
# every output checked against the client's fp64 reference.
# usage: run.sh ATTND_BINARY BUILD_DIR [LIBATTND_C]  (default BUILD_DIR/client/capi/libattnd_c.so)
set -euo pipefail
abs() { case $1 in /*) echo "$1" ;; *) echo "$PWD/$1" ;; esac; }
attnd=$(abs "$1")
build=$(abs "$2")
lib=$(abs "${3:-$build/client/capi/libattnd_c.so}")
root=$(cd "$(dirname "$0")/../.." && pwd)
venv="$build/python-venv"
# .ready marks a finished install: a run cut short (no network) starts over next time.
if [ ! -f "$venv/.ready" ] || [ "$root/client/python/requirements.txt" -nt "$venv/.ready" ] ||
   [ "$root/client/python/pyproject.toml" -nt "$venv/.ready" ]; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check -r "$root/client/python/requirements.txt"
  touch "$venv/.ready"
fi
# Every run: this tree's package, built by pip from pyproject.toml (its dependencies are in the
# venv already, so this needs no network).
"$venv/bin/pip" install -q --disable-pip-version-check --no-build-isolation "$root/client/python"
py="$venv/bin/python"
unset PYTHONPATH
cd "$build"  # never import the package from the source tree: the installed one is under test
installed=$("$py" -c 'import attnd_client; print(attnd_client.__file__)')
case "$installed" in
  "$venv"/*) ;;
  *) echo "attnd_client imported from $installed, not from $venv" >&2; exit 1 ;;
esac
if [ ! -f "$lib" ]; then
  echo "missing $lib: build it (ninja -C $build attnd_c)" >&2
  exit 1
fi
export ATTND_NATIVE_LIB="$lib"

sock=$(mktemp -u /tmp/attnd-py.XXXXXX.sock)
log=$(mktemp /tmp/attnd-py.XXXXXX.log)
"$attnd" --backend=cpu --unix_socket="$sock" --metrics_port=0 --num_layers=2 --num_qo_heads=8 \
  --num_kv_heads=2 --head_dim=64 --dtype=bf16 --page_size=16 --pages_per_device=1024 2>"$log" &
server=$!
trap 'kill -TERM $server 2>/dev/null; wait $server 2>/dev/null; rm -f "$log"' EXIT
for _ in $(seq 1 100); do
  grep -q "level=info listening" "$log" && break
  sleep 0.05
done
ATTND_TARGET="unix://$sock" "$py" -m pytest -q -p no:cacheprovider -rs "$root/client/python/tests"
"$py" "$root/client/python/example.py" --target "unix://$sock" --steps 4
