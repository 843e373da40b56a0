// The server's limits on what one request may ask, checked before anything is queued. Every
// message names the request field and the limit.
#ifndef ATTND_SERVER_ENGINE_LIMITS_H_
#define ATTND_SERVER_ENGINE_LIMITS_H_

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "server/config/config.h"
#include "server/engine/calls.h"
#include "server/engine/kv_pool.h"

namespace attnd {

absl::Status CheckLayer(uint32_t layer, const ServerConfig& config);

// A batch: 1..max_batch_size items, each with >= 1 new token (exactly 1 for Decode), at most
// max_tokens_per_request in all. Returns the total of new tokens.
absl::StatusOr<uint64_t> CheckItems(absl::Span<const AppendItem> items, const ServerConfig& config,
                                    bool decode);

// An export or import's ranges; returns the buffer's shape [layers][2][tokens][heads][dim].
absl::StatusOr<std::vector<uint64_t>> CheckTransfer(const KvTransferCall& call,
                                                    const ServerConfig& config);

}  // namespace attnd

#endif  // ATTND_SERVER_ENGINE_LIMITS_H_
