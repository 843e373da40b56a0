// The model a server serves, as a workload needs it: the shape of its tensors, the fp64
// reference's parameters, the tolerances outputs are checked to, and the request limits.
#ifndef ATTND_CLIENT_WORKLOAD_MODEL_H_
#define ATTND_CLIENT_WORKLOAD_MODEL_H_

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "attnd/v1/attention.pb.h"
#include "client/reference.h"

namespace attnd::workload {

struct Model {
  v1::ModelConfig config;
  client::AttentionParams params;
  v1::DType dtype = v1::DTYPE_UNSPECIFIED;
  int64_t layers = 0, qo_heads = 0, kv_heads = 0, head_dim = 0, page_size = 0;
  int64_t max_batch = 0;     // most items per request
  int64_t max_tokens = 0;    // most new tokens per request
  uint64_t max_seq_len = 0;  // most tokens per sequence and layer; 0: no limit
  double tolerance = 0;      // relative L2 error of out
  double lse_tolerance = 0;  // absolute error of lse
  // fp8 pools with per-layer scales: the device's scales per layer (empty for other pools).
  // The reference reads what the pool holds, scale * fp8(x / scale), not what was sent.
  std::vector<float> k_scales, v_scales;
  // fp8 pools with per-token scales: each (token, kv head) row is held as scale * fp8(x /
  // scale) with its own scale, max |x| / 448 of the row (1 for an all-zero row).
  bool token_scales = false;

  int64_t element_size() const;
  // Whether the pool stores fp8, so that what it holds is not what was sent.
  bool fp8() const { return token_scales || !k_scales.empty(); }
  // What the pool holds of `n` values of K (or V, `is_v`) sent for `layer`; a per-token pool's
  // n is whole rows of head_dim.
  std::vector<float> Held(const float* values, int64_t n, int64_t layer, bool is_v) const;
  int64_t q_row() const { return qo_heads * head_dim; }   // elements per query/output token
  int64_t kv_row() const { return kv_heads * head_dim; }  // elements per K or V token
};

// FAILED_PRECONDITION when the model is incomplete or inconsistent. Limits the server leaves
// at 0 (none) become 2^30.
absl::StatusOr<Model> ModelFromServerInfo(const v1::ServerInfo& info);

}  // namespace attnd::workload

#endif  // ATTND_CLIENT_WORKLOAD_MODEL_H_
