// The client's copy of a server sequence: its length per layer and, for the layers it checks,
// every token's K and V exactly as sent (dtype-rounded), [len][kv_heads][head_dim]. The fp64
// reference reads these; the server's answers must keep them in step.
#ifndef ATTND_CLIENT_WORKLOAD_SEQUENCE_H_
#define ATTND_CLIENT_WORKLOAD_SEQUENCE_H_

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/types/span.h"

namespace attnd::workload {

struct Sequence {
  uint64_t id = 0;
  int64_t prompt_len = 0;
  int64_t prompt_sent = 0;  // prompt tokens already sent
  bool imported = false;    // prompt KV written with Append only
  std::vector<int64_t> len;
  std::vector<bool> tracked;  // per layer: k/v kept (the benchmark keeps layer 0 only)
  std::vector<std::vector<float>> k, v;

  int64_t MaxLen() const;
  std::vector<uint64_t> Lengths() const { return {len.begin(), len.end()}; }
  // Cuts every layer to at most `target` tokens; `row` is elements per token.
  void TruncateTo(int64_t target, int64_t row);
};

// Sequences a phase owns, in creation order.
using SequenceList = std::vector<std::unique_ptr<Sequence>>;

// A new empty sequence of `layers` layers, every one tracked, appended to `list`.
Sequence* AddSequence(SequenceList& list, uint64_t id, int64_t layers);

// One request's items: (sequence, new tokens), new tokens packed in item order.
using Items = std::vector<std::pair<Sequence*, int64_t>>;

int64_t TotalTokens(const Items& items);

// Checks a response's `lengths` against the copies plus each item's new tokens, then adds the
// new rows (k, v: [tokens][row]; nullptr: lengths only) to the tracked copies of `layer`. An
// INTERNAL status names the first sequence the server disagrees on, which leaves the copies
// unusable from there on.
absl::Status Advance(const std::string& label, uint32_t layer, const Items& items,
                     absl::Span<const uint64_t> lengths, const float* k, const float* v,
                     int64_t row);

}  // namespace attnd::workload

#endif  // ATTND_CLIENT_WORKLOAD_SEQUENCE_H_
