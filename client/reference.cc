#include "client/reference.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace attnd::client {

AttentionParams ParamsFromModel(const v1::ModelConfig& model) {
  AttentionParams params;
  params.num_qo_heads = model.num_qo_heads();
  params.num_kv_heads = model.num_kv_heads();
  params.head_dim = model.head_dim();
  params.sm_scale = model.sm_scale() > 0 ? static_cast<double>(model.sm_scale())
                                         : 1.0 / std::sqrt(static_cast<double>(model.head_dim()));
  params.logits_soft_cap = model.logits_soft_cap();
  params.window_left = model.window_left();
  return params;
}

void DenseAttentionReference(const AttentionParams& params, const float* q, int64_t num_queries,
                             const float* k, const float* v, int64_t kv_len, double* out,
                             double* lse) {
  const int64_t hq = params.num_qo_heads;
  const int64_t hk = params.num_kv_heads;
  const int64_t d = params.head_dim;
  const int64_t group = hq / hk;
  const double cap = params.logits_soft_cap;
  std::vector<double> logits(static_cast<size_t>(kv_len));
  std::vector<double> acc(static_cast<size_t>(d));

  for (int64_t r = 0; r < num_queries; ++r) {
    const int64_t pos = kv_len - num_queries + r;
    const int64_t first =
        params.window_left >= 0 ? std::max<int64_t>(0, pos - params.window_left) : 0;
    for (int64_t h = 0; h < hq; ++h) {
      const float* qh = q + (r * hq + h) * d;
      const int64_t kvh = h / group;
      double max_logit = -std::numeric_limits<double>::infinity();
      for (int64_t j = first; j <= pos; ++j) {
        const float* kj = k + (j * hk + kvh) * d;
        double dot = 0;
        for (int64_t e = 0; e < d; ++e) dot += static_cast<double>(qh[e]) * kj[e];
        double logit = params.sm_scale * dot;
        if (cap > 0) logit = cap * std::tanh(logit / cap);
        logits[j] = logit;
        max_logit = std::max(max_logit, logit);
      }
      // Two passes with the max subtracted: exact enough in double for any logits we make.
      double denom = 0;
      std::fill(acc.begin(), acc.end(), 0.0);
      for (int64_t j = first; j <= pos; ++j) {
        const double p = std::exp(logits[j] - max_logit);
        denom += p;
        const float* vj = v + (j * hk + kvh) * d;
        for (int64_t e = 0; e < d; ++e) acc[e] += p * vj[e];
      }
      double* oh = out + (r * hq + h) * d;
      for (int64_t e = 0; e < d; ++e) oh[e] = acc[e] / denom;
      if (lse != nullptr) lse[r * hq + h] = max_logit + std::log(denom);
    }
  }
}

double RelativeL2Error(absl::Span<const float> out, absl::Span<const double> ref) {
  double diff = 0, norm = 0;
  for (size_t i = 0; i < out.size(); ++i) {
    if (!std::isfinite(out[i])) return std::numeric_limits<double>::infinity();
    const double delta = out[i] - ref[i];
    diff += delta * delta;
    norm += ref[i] * ref[i];
  }
  if (norm == 0) return diff == 0 ? 0 : std::numeric_limits<double>::infinity();
  return std::sqrt(diff / norm);
}

double MaxAbsError(absl::Span<const float> out, absl::Span<const double> ref) {
  double worst = 0;
  for (size_t i = 0; i < out.size(); ++i) {
    if (!std::isfinite(out[i])) return std::numeric_limits<double>::infinity();
    worst = std::max(worst, std::abs(out[i] - ref[i]));
  }
  return worst;
}

}  // namespace attnd::client
