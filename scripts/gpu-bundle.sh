#!/usr/bin/env bash
# Builds the CUDA tree here and packs what the GPU host needs into .device/gpu (git-ignored):
# the GPU kernel tests, the benchmarks, attnd, attnctl and the e2e tests, plus run-all.sh, which
# on the GPU host runs the kernel tests, the e2e suite and the demo against the CUDA backend.
#   scripts/gpu-bundle.sh        then, on the GPU host:   .device/gpu/run-all.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export ATTND_BUILD_DIR=${ATTND_BUILD_DIR:-build-cuda} ATTND_CUDA=ON
scripts/build.sh attnd attnctl e2e_test bad_input_test workload_test tenancy_test client_probe \
  region_abuse_test transport_test hardening_test deadline_test cuda_kernels_test cuda_region_e2e_test cuda_server_test decode_bench prefill_bench server_bench \
  kv_transfer_test kv_transfer_bench fp8_kv_test
b=$ATTND_BUILD_DIR
rm -rf .device/gpu
../shared/tools/device-bundle .device/gpu "$b/server/attnd" "$b/client/attnctl" \
  "$b/tests/e2e/e2e_test" "$b/tests/e2e/bad_input_test" "$b/tests/e2e/workload_test" \
  "$b/tests/e2e/tenancy_test" "$b/tests/e2e/client_probe" "$b/tests/e2e/region_abuse_test" \
  "$b/tests/e2e/transport_test" "$b/tests/e2e/hardening_test" "$b/tests/e2e/deadline_test" \
  "$b/tests/gpu/cuda_kernels_test" \
  "$b/tests/gpu/cuda_region_e2e_test" "$b/tests/gpu/cuda_server_test" "$b/bench/server_bench" \
  "$b/bench/decode_bench" "$b/bench/prefill_bench" "$b/tests/e2e/kv_transfer_test" \
  "$b/bench/kv_transfer_bench" "$b/tests/e2e/fp8_kv_test"
cat > .device/gpu/run-all.sh <<'RUN'
#!/usr/bin/env bash
set -u
d=$(cd "$(dirname "$0")" && pwd)
nvidia-smi -L
"$d/run" cuda_kernels_test 2>&1 | tail -3
export ATTND_BINARY=$d/bin/attnd ATTND_E2E_BACKEND=cuda ATTND_CLIENT_PROBE=$d/bin/client_probe
export ATTND_E2E_CUDA_DEVICES=$(nvidia-smi -L | wc -l)
for t in e2e_test bad_input_test workload_test tenancy_test region_abuse_test transport_test fp8_kv_test \
         hardening_test deadline_test; do
  "$d/run" $t 2>&1 | tail -3
done
"$d/run" cuda_region_e2e_test 2>&1 | tail -3
"$d/run" cuda_server_test 2>&1 | tail -3
sock=/tmp/attnd-gpu-demo.sock
"$d/run" attnd --backend=cuda --unix_socket=$sock --metrics_port=0 --num_layers=4 \
  --num_qo_heads=8 --num_kv_heads=2 --head_dim=64 --pages_per_device=8192 2>/tmp/attnd-gpu.log &
p=$!
for _ in $(seq 1 100); do grep -q listening /tmp/attnd-gpu.log && break; sleep 0.1; done
"$d/run" attnctl --target=unix://$sock demo 2>&1 | tail -12
kill -TERM $p; wait $p; echo "attnd exit=$?"
RUN
chmod +x .device/gpu/run-all.sh
echo "carry .device/gpu and run .device/gpu/run-all.sh on the GPU host"
