#include "server/engine/limits.h"

#include "absl/strings/str_cat.h"

namespace attnd {

absl::Status CheckLayer(uint32_t layer, const ServerConfig& config) {
  if (layer >= config.model.num_layers)
    return absl::InvalidArgumentError(absl::StrCat("layer: ", layer, " is out of range [0, ",
                                                   config.model.num_layers, ")"));
  return absl::OkStatus();
}

absl::StatusOr<uint64_t> CheckItems(absl::Span<const AppendItem> items, const ServerConfig& config,
                                    bool decode) {
  if (items.empty()) return absl::InvalidArgumentError("items: empty batch");
  if (static_cast<int64_t>(items.size()) > config.max_batch_size)
    return absl::InvalidArgumentError(absl::StrCat("items: ", items.size(),
                                                   " items exceed max_batch_size ",
                                                   config.max_batch_size));
  uint64_t total = 0;
  for (size_t i = 0; i < items.size(); ++i) {
    const int64_t n = items[i].num_new_tokens;
    if (n <= 0)
      return absl::InvalidArgumentError(absl::StrCat("items[", i, "].num_new_tokens: must be >= 1"));
    if (decode && n != 1)
      return absl::InvalidArgumentError(
          absl::StrCat("items[", i, "].num_new_tokens: ", n, "; Decode takes exactly 1"));
    total += static_cast<uint64_t>(n);
  }
  if (total > static_cast<uint64_t>(config.max_tokens_per_request))
    return absl::InvalidArgumentError(absl::StrCat("items: ", total,
                                                   " new tokens exceed max_tokens_per_request ",
                                                   config.max_tokens_per_request));
  return total;
}

absl::StatusOr<std::vector<uint64_t>> CheckTransfer(const KvTransferCall& call,
                                                    const ServerConfig& config) {
  const ModelShape& m = config.model;
  if (call.layer_begin >= call.layer_end || call.layer_end > m.num_layers)
    return absl::InvalidArgumentError(absl::StrCat("layer_begin, layer_end: [", call.layer_begin,
                                                   ", ", call.layer_end,
                                                   ") must be a non-empty range within [0, ",
                                                   m.num_layers, ")"));
  if (call.head_begin >= call.head_end || call.head_end > m.num_kv_heads)
    return absl::InvalidArgumentError(absl::StrCat("head_begin, head_end: [", call.head_begin,
                                                   ", ", call.head_end,
                                                   ") must be a non-empty range within [0, ",
                                                   m.num_kv_heads, ")"));
  if (call.num_tokens == 0 || call.num_tokens > static_cast<uint64_t>(config.max_seq_len))
    return absl::InvalidArgumentError(absl::StrCat("num_tokens: ", call.num_tokens,
                                                   " must be in [1, max_seq_len ",
                                                   config.max_seq_len, "]"));
  if (!call.sync.empty())
    return absl::FailedPreconditionError("sync: IPC events are not implemented for KV transfers yet");
  return std::vector<uint64_t>{call.layer_end - call.layer_begin, 2, call.num_tokens,
                               call.head_end - call.head_begin, static_cast<uint64_t>(m.head_dim)};
}

}  // namespace attnd
