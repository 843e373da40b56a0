// The engine's per-layer fp8 KV scales (kFp8E4M3 pools): each device keeps its layers' current
// scales (what its backend dequantizes with, reported by GetServerInfo and sent to pulling
// peers), and changes them only where no KV is stored: bytes already in the pool were quantized
// with the old scales, and a change under them would silently rescale them. Per-token pools
// have none (their scales are written by append into the pool).
#include <algorithm>
#include <optional>
#include <utility>

#include "absl/strings/str_cat.h"
#include "server/engine/engine.h"
#include "server/engine/kv_runs.h"

namespace attnd {

std::vector<kernels::KvScales> Engine::ScalesOf(const Device& device) const {
  absl::MutexLock lock(&device.scales_mu);
  return device.kv_scales;
}

absl::Status Engine::InitKvScales(Device& device) {
  if (!layer_scaled_pool()) return absl::OkStatus();
  // Validate() gave every layer a pair; an unvalidated config gets 1 and 1 for the rest.
  std::vector<kernels::KvScales> scales = config_.model.kv_scales;
  scales.resize(static_cast<size_t>(config_.model.num_layers));
  // Set explicitly, so the scales reported are the backend's whatever it read from the config.
  absl::Status s = RunOnWorker(device, [&]() -> absl::Status {
    return device.backend->SetKvScales(0, scales);
  });
  if (!s.ok())
    return absl::Status(s.code(), absl::StrCat("device ", device.id,
                                               ": setting the fp8 KV scales: ", s.message()));
  absl::MutexLock lock(&device.scales_mu);
  device.kv_scales = std::move(scales);
  return absl::OkStatus();
}

absl::Status Engine::CheckNoKvAt(const Device& device, int64_t layer_begin,
                                 int64_t layer_end) const {
  for (const Sequence* seq : device.pool->List()) {
    for (int64_t layer = layer_begin; layer < layer_end; ++layer) {
      if (seq->lengths[layer] == 0) continue;
      return absl::FailedPreconditionError(absl::StrCat(
          "layer_begin: sequence ", seq->id, " holds ", seq->lengths[layer], " tokens at layer ",
          layer, " of device ", device.id,
          "; scales change only while no sequence holds KV at their layers (release it or "
          "truncate it to 0 first)"));
    }
  }
  // A grant holds positions of every layer, read raw by peers that trust its scales.
  std::optional<uint64_t> granted = grants_.HeldSequenceOn(device.index);
  if (granted.has_value() || device.grants_in_making.load() > 0)
    return absl::FailedPreconditionError(absl::StrCat(
        "layer_begin: a KV grant", granted ? absl::StrCat(" of sequence ", *granted) : "",
        " holds pages of every layer of device ", device.id,
        " for pulls; scales change once it ends (RevokeKv)"));
  return absl::OkStatus();
}

absl::Status Engine::CheckPullScalesOn(const Device& device, const KvPullTarget& target) const {
  if (!layer_scaled_pool()) return absl::OkStatus();
  if (target.src_scales.size() != static_cast<size_t>(target.layer_end - target.layer_begin))
    return absl::FailedPreconditionError(absl::StrCat(
        "k_scales: the source sent ", target.src_scales.size(), " layers' fp8 scales for a pull of ",
        target.layer_end - target.layer_begin));
  absl::MutexLock lock(&device.scales_mu);
  return CheckPullScales(target.src_scales, target.src_layer_begin, device.kv_scales,
                         target.layer_begin);
}

void Engine::SetKvScales(uint32_t device, int64_t layer_begin,
                         std::vector<kernels::KvScales> scales, Done done) {
  auto d = FindDevice(device);
  if (!d.ok()) return std::move(done)(d.status());
  if (config_.model.kv_storage == kernels::KvStorage::kModelDType)
    return std::move(done)(absl::FailedPreconditionError(
        "kv_cache_dtype: this server's pool stores the model dtype (--kv_cache_dtype=auto); "
        "scales apply only to fp8 pools"));
  if (config_.model.kv_storage == kernels::KvStorage::kFp8E4M3PerToken)
    return std::move(done)(absl::FailedPreconditionError(
        "kv_cache_dtype: this server's pool has per-token scales (--kv_cache_dtype=fp8_per_token), "
        "computed at append for every token and kv head; there are no "
        "per-layer scales to set"));
  const int64_t layer_end = layer_begin + static_cast<int64_t>(scales.size());
  if (scales.empty() || layer_begin < 0 || layer_end > config_.model.num_layers)
    return std::move(done)(absl::InvalidArgumentError(absl::StrCat(
        "layer_begin: layers [", layer_begin, ", ", layer_end, ") are not a non-empty range of ",
        config_.model.num_layers)));
  PostDone(*d, std::move(done),
           [this, layer_begin, layer_end, scales = std::move(scales)](Device& d) -> absl::Status {
             if (absl::Status s = CheckNoKvAt(d, layer_begin, layer_end); !s.ok()) return s;
             absl::Status s = d.backend->SetKvScales(layer_begin, scales);
             if (!s.ok()) {
               const absl::StatusCode c = s.code();
               // A refusal changed nothing; anything else leaves the device unknown.
               if (c == absl::StatusCode::kInvalidArgument ||
                   c == absl::StatusCode::kFailedPrecondition ||
                   c == absl::StatusCode::kUnimplemented)
                 return s;
               return MarkFaulted(d, s, "SetKvScales");
             }
             absl::MutexLock lock(&d.scales_mu);
             std::copy(scales.begin(), scales.end(), d.kv_scales.begin() + layer_begin);
             return absl::OkStatus();
           });
}

}  // namespace attnd
