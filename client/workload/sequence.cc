#include "client/workload/sequence.h"

#include <algorithm>

#include "absl/strings/str_cat.h"

namespace attnd::workload {

int64_t Sequence::MaxLen() const { return *std::max_element(len.begin(), len.end()); }

void Sequence::TruncateTo(int64_t target, int64_t row) {
  for (size_t layer = 0; layer < len.size(); ++layer) {
    len[layer] = std::min(len[layer], target);
    if (tracked[layer]) {
      k[layer].resize(len[layer] * row);
      v[layer].resize(len[layer] * row);
    }
  }
}

Sequence* AddSequence(SequenceList& list, uint64_t id, int64_t layers) {
  auto seq = std::make_unique<Sequence>();
  seq->id = id;
  seq->len.assign(layers, 0);
  seq->tracked.assign(layers, true);
  seq->k.resize(layers);
  seq->v.resize(layers);
  list.push_back(std::move(seq));
  return list.back().get();
}

int64_t TotalTokens(const Items& items) {
  int64_t total = 0;
  for (const auto& [seq, n] : items) total += n;
  return total;
}

absl::Status Advance(const std::string& label, uint32_t layer, const Items& items,
                     absl::Span<const uint64_t> lengths, const float* k, const float* v,
                     int64_t row) {
  if (lengths.size() != items.size()) {
    return absl::InternalError(absl::StrCat(label, ": response has ", lengths.size(),
                                            " lengths for ", items.size(), " items"));
  }
  int64_t offset = 0;
  for (size_t i = 0; i < items.size(); ++i) {
    auto [seq, n] = items[i];
    const int64_t expected = seq->len[layer] + n;
    if (static_cast<int64_t>(lengths[i]) != expected) {
      // The client's copy and the server disagree from here on; stop rather than report
      // every later call as wrong.
      return absl::InternalError(absl::StrCat(label, ": sequence ", seq->id, " has length ",
                                              lengths[i], ", expected ", expected));
    }
    seq->len[layer] = expected;
    if (seq->tracked[layer] && k != nullptr) {
      seq->k[layer].insert(seq->k[layer].end(), k + offset * row, k + (offset + n) * row);
      seq->v[layer].insert(seq->v[layer].end(), v + offset * row, v + (offset + n) * row);
    }
    offset += n;
  }
  return absl::OkStatus();
}

}  // namespace attnd::workload
