#!/usr/bin/env bash
# Python per-call host time (bench/python_call_bench.py) against a CUDA attnd under MPS, with
# and without attnd's graphs. Run from the repository root; carry .device/t, .whl and the stubs.
set -u
root=$PWD
tar xzf .device/t/gpu.tgz -C .device/t && d=$root/.device/t/gpu
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$root/client/python PYTHONUNBUFFERED=1 ATTND_PROTO_DIR=/nonexistent
export ATTND_NATIVE_LIB=$d/bin/libattnd_c.so
export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps CUDA_MPS_LOG_DIRECTORY=/tmp/mpslog
mkdir -p /tmp/mps /tmp/mpslog && nvidia-cuda-mps-control -d
for extra in "" "--cuda_graphs=false"; do
  echo "== attnd $extra"
  "$d/run" attnd --backend=cuda --num_layers=1 --num_qo_heads=32 --num_kv_heads=8 --head_dim=128 \
    --dtype=bf16 --page_size=16 --pages_per_device=20000 --max_batch_size=128 \
    --unix_socket=/tmp/attnd-call.sock --metrics_port=0 $extra 2>$OUT/attnd-call.log & p=$!
  for i in $(seq 100); do grep -q listening $OUT/attnd-call.log && break; sleep 0.1; done
  timeout 200 python3 bench/python_call_bench.py --target unix:///tmp/attnd-call.sock 2>&1 | tail -8
  kill -TERM $p; wait $p
done
echo quit | nvidia-cuda-mps-control
