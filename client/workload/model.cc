#include "client/workload/model.h"

#include <cmath>

#include "absl/status/status.h"
#include "client/describe.h"
#include "client/half.h"
#include "client/tensor.h"

namespace attnd::workload {
namespace {

constexpr int64_t kUnlimited = int64_t{1} << 30;

// Tolerances of the checks by dtype: the server computes in fp32 from inputs rounded to the
// dtype, then rounds its output to the dtype.
void SetTolerances(Model& model) {
  switch (model.dtype) {
    case v1::DTYPE_FLOAT32:
      model.tolerance = 1e-4;
      model.lse_tolerance = 1e-3;
      break;
    case v1::DTYPE_FLOAT16:
      model.tolerance = 2e-3;
      model.lse_tolerance = 5e-3;
      break;
    default:
      model.tolerance = 1e-2;
      model.lse_tolerance = 1e-2;
      break;
  }
}

}  // namespace

int64_t Model::element_size() const { return client::DTypeSize(dtype); }

std::vector<float> Model::Held(const float* values, int64_t n, int64_t layer, bool is_v) const {
  std::vector<float> held(values, values + n);
  if (token_scales) {
    for (int64_t row = 0; row + head_dim <= n; row += head_dim) {
      float amax = 0.0f;
      for (int64_t i = row; i < row + head_dim; ++i) amax = std::fmax(amax, std::fabs(held[i]));
      const float scale = amax > 0.0f ? amax / 448.0f : 1.0f;
      for (int64_t i = row; i < row + head_dim; ++i)
        held[i] = scale * client::Fp8E4M3BitsToFloat(client::FloatToFp8E4M3Bits(held[i] / scale));
    }
    return held;
  }
  const std::vector<float>& scales = is_v ? v_scales : k_scales;
  if (scales.empty()) return held;
  const float scale = scales[static_cast<size_t>(layer)];
  for (float& x : held)
    x = scale * client::Fp8E4M3BitsToFloat(client::FloatToFp8E4M3Bits(x / scale));
  return held;
}

absl::StatusOr<Model> ModelFromServerInfo(const v1::ServerInfo& info) {
  Model model;
  model.config = info.model();
  model.dtype = model.config.dtype();
  model.layers = model.config.num_layers();
  model.qo_heads = model.config.num_qo_heads();
  model.kv_heads = model.config.num_kv_heads();
  model.head_dim = model.config.head_dim();
  model.page_size = model.config.page_size();
  if (model.element_size() == 0 || model.layers == 0 || model.qo_heads == 0 ||
      model.kv_heads == 0 || model.head_dim == 0 || model.page_size == 0 ||
      model.qo_heads % model.kv_heads != 0) {
    return absl::FailedPreconditionError("ServerInfo.model is incomplete or inconsistent: " +
                                         client::DescribeModel(model.config));
  }
  model.params = client::ParamsFromModel(model.config);
  SetTolerances(model);
  model.max_batch = info.max_batch_size() > 0 ? info.max_batch_size() : kUnlimited;
  model.max_tokens = info.max_tokens_per_request() > 0 ? info.max_tokens_per_request() : kUnlimited;
  model.max_seq_len = info.max_seq_len();
  return model;
}

}  // namespace attnd::workload
