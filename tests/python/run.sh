#!/usr/bin/env bash
# The Python client end to end: a virtualenv with client/python/requirements.txt (made once
# under the build directory), the client's offline tests, then example.py against a real attnd
# over a Unix socket, every output checked against the client's fp64 reference.
# usage: run.sh ATTND_BINARY BUILD_DIR
set -euo pipefail
attnd=$1
build=$2
root=$(cd "$(dirname "$0")/../.." && pwd)
venv="$build/python-venv"
# .ready marks a finished install: a run cut short (no network) starts over next time.
if [ ! -f "$venv/.ready" ] || [ "$root/client/python/requirements.txt" -nt "$venv/.ready" ]; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check -r "$root/client/python/requirements.txt"
  touch "$venv/.ready"
fi
py="$venv/bin/python"
export PYTHONPATH="$root/client/python"

"$py" -m pytest -q "$root/client/python/tests"

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
"$py" "$root/client/python/example.py" --target "unix://$sock" --steps 4
