// A dense fp64 attention reference on the client side, so a client can check every output the
// server returns without trusting any server code (kernels/ has its own reference, but the
// client must not depend on it, and an independent one is the stronger check).
#ifndef ATTND_CLIENT_REFERENCE_H_
#define ATTND_CLIENT_REFERENCE_H_

#include <cstdint>

#include "absl/types/span.h"
#include "attnd/v1/attention.pb.h"

namespace attnd::client {

struct AttentionParams {
  int64_t num_qo_heads = 0;
  int64_t num_kv_heads = 0;  // divides num_qo_heads; query head h reads kv head h / group
  int64_t head_dim = 0;
  double sm_scale = 0;         // logits scale
  double logits_soft_cap = 0;  // > 0: logit = cap * tanh(sm_scale * q.k / cap)
  int64_t window_left = -1;    // >= 0: query at position i sees keys [i - window_left, i]
};

// The parameters a server's model implies; sm_scale 0 in the config means 1/sqrt(head_dim).
AttentionParams ParamsFromModel(const v1::ModelConfig& model);

// Causal attention of the last `num_queries` positions of a sequence over all `kv_len` of its
// positions, in double: query r sits at position kv_len - num_queries + r and sees key j iff
// j <= its position and (window_left < 0 or position - j <= window_left).
//   q:   [num_queries][num_qo_heads][head_dim]
//   k,v: [kv_len][num_kv_heads][head_dim]
//   out: [num_queries][num_qo_heads][head_dim]
//   lse: [num_queries][num_qo_heads], natural log of the softmax denominator (may be empty)
// Inputs are floats holding values already rounded to the model dtype, i.e. exactly what the
// server reads.
void DenseAttentionReference(const AttentionParams& params, const float* q, int64_t num_queries,
                             const float* k, const float* v, int64_t kv_len, double* out,
                             double* lse);

// ||out - ref|| / ||ref|| (L2 over all elements); +inf if out holds a NaN or inf, so poisoned
// outputs the server never wrote cannot pass.
double RelativeL2Error(absl::Span<const float> out, absl::Span<const double> ref);

// max |out - ref|; +inf if out holds a NaN or inf.
double MaxAbsError(absl::Span<const float> out, absl::Span<const double> ref);

}  // namespace attnd::client

#endif  // ATTND_CLIENT_REFERENCE_H_
