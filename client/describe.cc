#include "client/describe.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "client/tensor.h"

namespace attnd::client {

std::string KvLayoutName(v1::KvLayout layout) {
  switch (layout) {
    case v1::KV_LAYOUT_NHD:
      return "NHD";
    case v1::KV_LAYOUT_HND:
      return "HND";
    default:
      return "unspecified";
  }
}

namespace {

std::string KvCacheName(v1::KvCacheDType storage) {
  switch (storage) {
    case v1::KV_CACHE_DTYPE_MODEL:
      return "model";
    case v1::KV_CACHE_DTYPE_FP8_E4M3:
      return "fp8_e4m3";
    case v1::KV_CACHE_DTYPE_FP8_E4M3_PER_TOKEN:
      return "fp8_per_token";
    default:
      return absl::StrCat("unknown(", static_cast<int>(storage), ")");
  }
}

}  // namespace

std::string DescribeModel(const v1::ModelConfig& model) {
  std::string out = absl::StrFormat(
      "layers=%d qo_heads=%d kv_heads=%d head_dim=%d dtype=%s page_size=%d layout=%s "
      "sm_scale=%g",
      model.num_layers(), model.num_qo_heads(), model.num_kv_heads(), model.head_dim(),
      DTypeName(model.dtype()), model.page_size(), KvLayoutName(model.kv_layout()),
      model.sm_scale());
  absl::StrAppend(&out, " soft_cap=",
                  model.logits_soft_cap() > 0 ? absl::StrFormat("%g", model.logits_soft_cap())
                                              : std::string("off"));
  absl::StrAppend(
      &out, " window_left=",
      model.window_left() >= 0 ? absl::StrCat(model.window_left()) : std::string("none"));
  absl::StrAppend(&out, " kv_cache=", KvCacheName(model.kv_cache_dtype()));
  return out;
}

}  // namespace attnd::client
