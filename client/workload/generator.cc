#include "client/workload/generator.h"

#include <algorithm>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "client/workload/calls.h"
#include "client/workload/lifecycle.h"

namespace attnd::workload {
namespace {

// The next Prefill request's items: up to `budget` tokens, `chunk` per sequence, taken from
// `todo` round-robin from `start`.
Items NextPrefillItems(const Session& s, const std::vector<Sequence*>& todo, size_t start,
                       int64_t budget, int64_t chunk) {
  Items items;
  for (size_t i = 0;
       i < todo.size() && budget > 0 && static_cast<int64_t>(items.size()) < s.model.max_batch;
       ++i) {
    Sequence* seq = todo[(start + i) % todo.size()];
    const int64_t n = std::min({seq->prompt_len - seq->prompt_sent, chunk, budget});
    if (n <= 0) continue;
    items.emplace_back(seq, n);
    budget -= n;
  }
  return items;
}

// A plain rollback that crosses back over a page boundary (when the length allows)...
absl::Status RollBackOne(Session& s, SequenceList& seqs, const Sequence* fork_child) {
  Sequence* plain = nullptr;
  for (auto& seq : seqs) {
    if (seq.get() == fork_child || seq->imported || seq->len[0] <= 2) continue;
    if (plain == nullptr) plain = seq.get();
    if (seq->len[0] % s.model.page_size != 0) {
      plain = seq.get();
      break;
    }
  }
  if (plain == nullptr) return absl::OkStatus();
  const int64_t len = plain->MaxLen();
  const int64_t k = std::clamp<int64_t>(len % s.model.page_size + 1, 1, len - 1);
  return TruncateOne(s, *plain, len - k, "speculative rollback");
}

// ...and one of the fork child into the last full page it shares with its parent: its next
// token lands in a shared page, which must be copied, or the parent's next check fails.
absl::Status TruncateIntoSharedPage(Session& s, Sequence* fork_child, int64_t fork_len) {
  if (fork_child == nullptr || fork_len <= 1) return absl::OkStatus();
  const int64_t page = s.model.page_size;
  int64_t target = fork_len - 1;
  if (page > 1 && fork_len >= page) {
    target = (fork_len / page - 1) * page + std::max<int64_t>(1, page / 2);
  }
  return TruncateOne(s, *fork_child, target, "into a page shared with its parent");
}

// One decode step: one token for every sequence, every layer, in requests of at most
// max_batch items. `decode_calls` counts the calls so far (every third one asks for lse).
absl::Status DecodeStep(Session& s, const SequenceList& seqs, int step, int& decode_calls) {
  std::vector<Sequence*> batch;
  for (auto& seq : seqs) batch.push_back(seq.get());
  // Even steps through the unary Decode, odd steps through the Stream: both transports get
  // the same checks.
  const Transport transport = step % 2 == 0 ? Transport::kUnary : Transport::kStream;
  const size_t max_batch = s.model.max_batch;
  for (uint32_t layer = 0; layer < s.model.layers; ++layer) {
    for (size_t first = 0; first < batch.size(); first += max_batch) {
      Items items;
      for (size_t i = first; i < std::min(batch.size(), first + max_batch); ++i) {
        items.emplace_back(batch[i], 1);
      }
      const bool want_lse = decode_calls % 3 == 1;
      if (absl::Status st = FreshAttention(s, Op::kDecode, transport, layer, items, want_lse);
          !st.ok()) {
        return st;
      }
      ++decode_calls;
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status PrefillPrompts(Session& s, SequenceList& seqs) {
  const int64_t budget = std::min<int64_t>(
      {std::max(1, s.options.prefill_tokens), s.model.max_tokens, s.buffers->main().tokens});
  const int64_t chunk = std::max(1, s.options.prefill_chunk);
  std::vector<Sequence*> todo;
  for (auto& seq : seqs) {
    if (!seq->imported) todo.push_back(seq.get());
  }
  int requests = 0;
  size_t start = 0;  // rotates so requests mix different sequences' chunks
  const Clock::time_point begin = Clock::now();
  while (true) {
    const Items items = NextPrefillItems(s, todo, start, budget, chunk);
    if (items.empty()) break;
    start = (start + items.size()) % std::max<size_t>(todo.size(), 1);
    for (uint32_t layer = 0; layer < s.model.layers; ++layer) {
      // lse on every third call: checked when asked for, and not written when not.
      const bool want_lse = (s.accounting.prefill.count() % 3) == 0;
      if (absl::Status st =
              FreshAttention(s, Op::kPrefill, Transport::kUnary, layer, items, want_lse);
          !st.ok()) {
        return st;
      }
    }
    for (auto& [seq, n] : items) seq->prompt_sent += n;
    ++requests;
  }
  s.out(
      "prefill: %d requests x %d layers in %.2f s (chunks of <= %d tokens, <= %d tokens "
      "per request)\n",
      requests, s.model.layers, SecondsSince(begin), chunk, budget);
  return absl::OkStatus();
}

absl::Status ImportPrompt(Session& s, Sequence& seq) {
  const int64_t budget = std::min<int64_t>(s.model.max_tokens, s.buffers->main().tokens);
  int requests = 0;
  while (seq.prompt_sent < seq.prompt_len) {
    const int64_t n = std::min(seq.prompt_len - seq.prompt_sent, budget);
    for (uint32_t layer = 0; layer < s.model.layers; ++layer) {
      if (absl::Status st = FreshAppend(s, layer, {{&seq, n}}); !st.ok()) return st;
    }
    seq.prompt_sent += n;
    ++requests;
  }
  absl::StatusOr<v1::SequenceInfo> got = s.client.GetSequence(s.options.device, seq.id);
  if (!got.ok()) return got.status();
  for (int64_t layer = 0; layer < s.model.layers; ++layer) {
    if (got->layer_lengths_size() != s.model.layers ||
        static_cast<int64_t>(got->layer_lengths(layer)) != seq.prompt_len) {
      s.verifier.Fail(absl::StrCat("GetSequence ", seq.id, " after import: layer lengths [",
                                   absl::StrJoin(got->layer_lengths(), ","), "], expected ",
                                   seq.prompt_len));
      break;
    }
  }
  s.out(
      "import: sequence %d, %d prompt tokens written with Append only (%d requests x %d "
      "layers)\n",
      seq.id, seq.prompt_len, requests, s.model.layers);
  return absl::OkStatus();
}

absl::Status DecodeSteps(Session& s, SequenceList& seqs) {
  const int steps = s.options.steps;
  const int fork_step = steps / 3;
  const int truncate_step = (2 * steps) / 3;
  Sequence* fork_child = nullptr;
  int64_t fork_len = 0;
  int decode_calls = 0;
  const Clock::time_point begin = Clock::now();

  for (int step = 0; step <= steps; ++step) {
    if (step == fork_step) {
      absl::StatusOr<Sequence*> child = ForkOne(s, seqs, step);
      if (!child.ok()) return child.status();
      fork_child = *child;
      fork_len = fork_child->len[0];
    }
    if (step == truncate_step) {
      if (absl::Status st = RollBackOne(s, seqs, fork_child); !st.ok()) return st;
      if (absl::Status st = TruncateIntoSharedPage(s, fork_child, fork_len); !st.ok()) return st;
    }
    if (step == steps) break;
    if (absl::Status st = DecodeStep(s, seqs, step, decode_calls); !st.ok()) return st;
  }
  s.out("decode: %d steps x %d layers, %d sequences at the end, %d calls in %.2f s\n", steps,
        s.model.layers, seqs.size(), decode_calls, SecondsSince(begin));
  return absl::OkStatus();
}

}  // namespace attnd::workload
