#!/usr/bin/env bash
# The main job on a fresh machine: installs what is missing, builds attnd, starts it (the CUDA
# backend where a GPU and a CUDA build are present, else the CPU backend), drives a real
# prefill + decode workload through the client with every output checked, prints throughput,
# latency, server stats and the /metrics it exposes, then stops the server with SIGTERM.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/build.sh attnd attnctl
build=${ATTND_BUILD_DIR:-build}

sock=${ATTND_SOCKET:-/tmp/attnd-demo.$$.sock}
metrics_port=${ATTND_METRICS_PORT:-9464}
tcp_port=${ATTND_TCP_PORT:-50051}
log=$(mktemp /tmp/attnd-demo.XXXXXX.log)
# TCP callers have no uid of their own; a token that names ours lets the TCP demo share memory.
tokens=$(mktemp /tmp/attnd-demo.XXXXXX.tokens)
token="demo-$(od -An -tx8 -N16 /dev/urandom | tr -d ' \n')"
echo "demo $token uid=$(id -u)" >"$tokens"
"$build/server/attnd" --backend=auto --unix_socket="$sock" --metrics_port="$metrics_port" \
  --tcp_address="127.0.0.1:$tcp_port" --insecure_tcp --token_file="$tokens" \
  --num_layers=4 --num_qo_heads=8 --num_kv_heads=2 --head_dim=64 --dtype=bf16 \
  --page_size=16 --pages_per_device=8192 2>"$log" &
server=$!
stop() {
  kill -TERM "$server" 2>/dev/null || true
  wait "$server" 2>/dev/null || true
  rm -f "$tokens"
}
trap stop EXIT

ctl=("$build/client/attnctl" --target="unix://$sock")
for _ in $(seq 1 100); do
  "${ctl[@]}" health >/dev/null 2>&1 && break
  kill -0 "$server" 2>/dev/null || { cat "$log" >&2; echo "demo: attnd exited" >&2; exit 1; }
  sleep 0.1
done
"${ctl[@]}" health
"${ctl[@]}" info
status=0
echo "=== demo over the Unix socket ==="
"${ctl[@]}" demo "$@" || status=$?
echo "=== demo over TCP (shorter run; the same 64-sequence Decode benchmark) ==="
"$build/client/attnctl" --target="127.0.0.1:$tcp_port" --token="$token" demo --demo_sequences=4 --demo_steps=4 "$@" || status=$?
"${ctl[@]}" stats
echo "--- /metrics (attnd_ series) ---"
curl -sf "http://127.0.0.1:$metrics_port/metrics" | grep -E '^attnd_' | grep -v '_bucket' || true
stop
trap - EXIT
echo "--- server log ---"
cat "$log"
exit $status
