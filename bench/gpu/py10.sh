#!/usr/bin/env bash
# Issue 10 on the GPU host: the package's torch and Transformers tests, the example, then the
# model benchmark (MODEL_ARGS). Run from the repository root; carry .device/t, .whl and the
# generated stubs client/python/attnd_client/attnd.
set -u
root=$PWD
tar xzf .device/t/gpu.tgz -C .device/t && d=$root/.device/t/gpu
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$root/client/python PYTHONUNBUFFERED=1 ATTND_PROTO_DIR=/nonexistent
export ATTND_NATIVE_LIB=$d/bin/libattnd_c.so ATTND_BINARY=$d/bin/attnd
export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps CUDA_MPS_LOG_DIRECTORY=/tmp/mpslog
mkdir -p /tmp/mps /tmp/mpslog && nvidia-cuda-mps-control -d && echo "MPS on"
python3 -c "import attnd_client.native as n, attnd_client.torch as t; print('package ok')" 2>&1 | tail -3
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  "$d/run" attnd --backend=cuda --num_layers=2 --num_qo_heads=8 --num_kv_heads=2 --head_dim=64 \
    --dtype=bf16 --page_size=16 --pages_per_device=4096 --unix_socket=/tmp/attnd-tf.sock \
    --metrics_port=0 2>$OUT/attnd-tf.log & p=$!
  for i in $(seq 100); do grep -q listening $OUT/attnd-tf.log && break; sleep 0.1; done
  ATTND_TARGET=unix:///tmp/attnd-tf.sock timeout 200 python3 -m pytest -q -rs -x \
    client/python/tests/test_torch_gpu.py client/python/tests/test_transformers_gpu.py 2>&1 | tee $OUT/pytest.log | tail -25
  ATTND_TARGET=unix:///tmp/attnd-tf.sock timeout 60 python3 client/python/examples/torch_decode.py --target unix:///tmp/attnd-tf.sock 2>&1 | tail -8
  kill -TERM $p; wait $p; echo "attnd exit $?"
fi
timeout ${MODEL_TIMEOUT:-300} python3 bench/model_bench.py --target unix:///tmp/attnd-model.sock \
  --attnd-cmd "$d/run attnd --backend=cuda --num_layers=${LAYERS:-32} --num_qo_heads=32 --num_kv_heads=8 --head_dim=128 --dtype=bf16 --page_size=16 --pages_per_device=${PAGES:-33280} --max_batch_size=128 --max_tokens_per_request=8192 --unix_socket=/tmp/attnd-model.sock --metrics_port=0 ${ATTND_EXTRA:-}" \
  --attnd-log $OUT/attnd-model.log --md $OUT/model.md --layers ${LAYERS:-32} ${MODEL_ARGS:-} 2>&1 | tee $OUT/model.log | tail -40
echo quit | nvidia-cuda-mps-control
