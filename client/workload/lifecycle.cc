#include "client/workload/lifecycle.h"

#include <algorithm>
#include <utility>
#include <vector>

#include "absl/random/distributions.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace attnd::workload {
namespace {

template <typename Lengths>
std::string Joined(const Lengths& lengths) {
  return absl::StrCat("[", absl::StrJoin(lengths, ","), "]");
}

std::vector<uint64_t> Lengths(const v1::SequenceInfo& info) {
  return {info.layer_lengths().begin(), info.layer_lengths().end()};
}

// The longest prompt that leaves room for the decode steps under max_seq_len.
absl::StatusOr<int64_t> PromptCap(const Session& s) {
  int64_t cap = std::max(1, s.options.max_prompt);
  if (s.model.max_seq_len > 0) {
    const int64_t room = static_cast<int64_t>(s.model.max_seq_len) - s.options.steps - 1;
    if (room < 1) return absl::FailedPreconditionError("max_seq_len leaves no room for a prompt");
    cap = std::min(cap, room);
  }
  return cap;
}

// Lengths: 1, exactly one page, one page plus one, then random.
std::vector<int64_t> PromptLengths(Session& s, int64_t cap) {
  const int64_t max_prompt = std::max(1, s.options.max_prompt);
  const int64_t page = s.model.page_size;
  std::vector<int64_t> lengths;
  for (int i = 0; i < s.options.sequences; ++i) {
    // The first three are fixed; only the rest draw from the seed.
    int64_t len = i == 0 ? 1 : page + (i - 1);
    if (i >= 3) len = absl::Uniform<int64_t>(absl::IntervalClosed, s.rng, 1, max_prompt);
    lengths.push_back(std::clamp<int64_t>(len, 1, cap));
  }
  return lengths;
}

// Every sequence at its final length, the fork child, and rounding up per page.
absl::Status CheckCapacity(const Session& s, const std::vector<int64_t>& lengths, int64_t cap) {
  const int64_t steps = s.options.steps, page = s.model.page_size;
  uint64_t pages = 0;
  for (int64_t len : lengths) pages += (len + steps + page) / page + 1;
  pages += (cap + steps + page) / page + 1;  // the fork child's copy
  if (pages > s.pages_free_at_start) {
    return absl::ResourceExhaustedError(
        absl::StrCat("the demo needs up to ", pages, " pages on device ", s.options.device,
                     "; the server has ", s.pages_free_at_start, " free"));
  }
  return absl::OkStatus();
}

absl::Status CreateOne(Session& s, const Sequence& seq) {
  absl::StatusOr<v1::SequenceInfo> created = s.client.CreateSequence(s.options.device, seq.id);
  if (!created.ok()) {
    return absl::Status(created.status().code(),
                        absl::StrCat("CreateSequence ", seq.id, ": ", created.status().ToString()));
  }
  s.live_ids.insert(seq.id);
  if (created->layer_lengths_size() != s.model.layers ||
      std::any_of(created->layer_lengths().begin(), created->layer_lengths().end(),
                  [](uint64_t l) { return l != 0; })) {
    s.verifier.Fail(absl::StrCat("CreateSequence ", seq.id, ": expected ", s.model.layers,
                                 " zero layer lengths, got ", Joined(created->layer_lengths())));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status CreateSequences(Session& s, SequenceList& seqs) {
  const int n = s.options.sequences;
  absl::StatusOr<int64_t> cap = PromptCap(s);
  if (!cap.ok()) return cap.status();
  const std::vector<int64_t> lengths = PromptLengths(s, *cap);
  if (absl::Status st = CheckCapacity(s, lengths, *cap); !st.ok()) return st;

  int64_t total = 0;
  for (int i = 0; i < n; ++i) {
    Sequence* seq = AddSequence(seqs, s.next_id++, s.model.layers);
    seq->prompt_len = lengths[i];
    // The last sequence (when there are at least two) gets its prompt KV imported with Append.
    seq->imported = n >= 2 && i == n - 1;
    total += lengths[i];
    if (absl::Status st = CreateOne(s, *seq); !st.ok()) return st;
  }
  s.out("sequences: %d created (ids from %d), prompt lengths [%s], %d tokens\n", n,
        seqs.front()->id, absl::StrJoin(lengths, " "), total);

  // A duplicate id must be refused and change nothing.
  absl::StatusOr<v1::SequenceInfo> dup = s.client.CreateSequence(s.options.device, seqs[0]->id);
  if (dup.status().code() != absl::StatusCode::kAlreadyExists) {
    s.verifier.Fail(absl::StrCat("CreateSequence of a live id: expected ALREADY_EXISTS, got ",
                                 dup.status().ToString()));
  }
  return absl::OkStatus();
}

absl::StatusOr<Sequence*> ForkOne(Session& s, SequenceList& seqs, int step) {
  // The parent ends mid-page, so the child shares full pages and must copy the partial one.
  const int64_t page = s.model.page_size;
  Sequence* parent = seqs.back().get();
  for (auto& seq : seqs) {
    if (!seq->imported && seq->len[0] > page && seq->len[0] % page != 0) {
      parent = seq.get();
      break;
    }
  }
  const uint64_t child_id = s.next_id++;
  absl::StatusOr<v1::SequenceInfo> forked =
      s.client.ForkSequence(s.options.device, parent->id, child_id);
  if (!forked.ok()) {
    return absl::Status(forked.status().code(),
                        absl::StrCat("ForkSequence ", parent->id, " -> ", child_id, ": ",
                                     forked.status().ToString()));
  }
  s.live_ids.insert(child_id);
  const Sequence parent_copy = *parent;  // seqs may reallocate below
  Sequence* child = AddSequence(seqs, child_id, s.model.layers);
  *child = parent_copy;
  child->id = child_id;
  if (Lengths(*forked) != parent_copy.Lengths()) {
    s.verifier.Fail(absl::StrCat("ForkSequence: child layer lengths ",
                                 Joined(forked->layer_lengths()), ", expected ",
                                 Joined(parent_copy.len)));
  }
  s.out("fork: step %d, sequence %d (length %d) -> %d; %d pages, %d shared\n", step, parent_copy.id,
        parent_copy.len[0], child_id, forked->num_pages(), forked->shared_pages());

  // A fork onto a live id must be refused.
  absl::StatusOr<v1::SequenceInfo> dup =
      s.client.ForkSequence(s.options.device, parent_copy.id, child_id);
  if (dup.status().code() != absl::StatusCode::kAlreadyExists) {
    s.verifier.Fail(absl::StrCat("ForkSequence onto a live id: expected ALREADY_EXISTS, got ",
                                 dup.status().ToString()));
  }
  return child;
}

absl::Status TruncateOne(Session& s, Sequence& seq, int64_t target, const std::string& why) {
  const int64_t before = seq.MaxLen();
  absl::StatusOr<v1::SequenceInfo> got =
      s.client.TruncateSequence(s.options.device, seq.id, static_cast<uint64_t>(target));
  if (!got.ok()) {
    return absl::Status(got.status().code(), absl::StrCat("TruncateSequence ", seq.id, " to ",
                                                          target, ": ", got.status().ToString()));
  }
  seq.TruncateTo(target, s.model.kv_row());
  if (Lengths(*got) != seq.Lengths()) {
    s.verifier.Fail(absl::StrCat("TruncateSequence ", seq.id, ": layer lengths ",
                                 Joined(got->layer_lengths()), ", expected ", Joined(seq.len)));
  }
  s.out(
      "truncate: sequence %d from %d to %d tokens (rolled back %d; %s); %d pages, %d "
      "shared\n",
      seq.id, before, target, before - target, why, got->num_pages(), got->shared_pages());
  return absl::OkStatus();
}

absl::Status CheckServerLengths(Session& s, const SequenceList& seqs) {
  absl::StatusOr<v1::ListSequencesResponse> list = s.client.ListSequences(s.options.device);
  if (!list.ok()) return list.status();
  int found = 0;
  for (const auto& seq : seqs) {
    const auto info =
        std::find_if(list->sequences().begin(), list->sequences().end(),
                     [&](const v1::SequenceInfo& i) { return i.seq_id() == seq->id; });
    if (info == list->sequences().end()) {
      s.verifier.Fail(absl::StrCat("ListSequences does not list live sequence ", seq->id));
      continue;
    }
    ++found;
    if (Lengths(*info) != seq->Lengths()) {
      s.verifier.Fail(absl::StrCat("ListSequences: sequence ", seq->id, " has layer lengths ",
                                   Joined(info->layer_lengths()), ", expected ", Joined(seq->len)));
    }
    // Pages span all layers, so a sequence needs as many as its longest layer fills.
    const uint64_t pages = (seq->MaxLen() + s.model.page_size - 1) / s.model.page_size;
    if (info->num_pages() != pages) {
      s.verifier.Fail(absl::StrCat("ListSequences: sequence ", seq->id, " of length ",
                                   seq->MaxLen(), " holds ", info->num_pages(), " pages, expected ",
                                   pages));
    }
  }
  s.out("list: %d of %d sequences listed with the expected lengths and pages\n", found,
        seqs.size());
  return absl::OkStatus();
}

absl::Status ReleaseAll(Session& s, SequenceList& seqs) {
  const uint32_t device = s.options.device;
  uint64_t freed = 0;
  for (const auto& seq : seqs) {
    absl::StatusOr<uint64_t> got = s.client.ReleaseSequence(device, seq->id);
    if (!got.ok()) {
      return absl::Status(got.status().code(),
                          absl::StrCat("ReleaseSequence ", seq->id, ": ", got.status().ToString()));
    }
    s.live_ids.erase(seq->id);
    freed += *got;
  }
  if (!seqs.empty()) {
    absl::StatusOr<v1::SequenceInfo> gone = s.client.GetSequence(device, seqs[0]->id);
    if (gone.status().code() != absl::StatusCode::kNotFound) {
      s.verifier.Fail(absl::StrCat("GetSequence of a released sequence: expected NOT_FOUND, got ",
                                   gone.status().ToString()));
    }
  }
  s.out("release: %d sequences, %d pages freed\n", seqs.size(), freed);
  seqs.clear();

  // With nobody else using the device, every page must be back.
  absl::StatusOr<v1::ServerInfo> info = s.client.GetServerInfo();
  if (!info.ok()) return info.status();
  for (const v1::DeviceInfo& d : info->devices()) {
    if (d.device() != device) continue;
    if (d.live_sequences() == s.live_at_start && d.free_pages() != s.pages_free_at_start) {
      s.verifier.Fail(absl::StrCat("after releasing every sequence, device ", d.device(), " has ",
                                   d.free_pages(), " free pages; it had ", s.pages_free_at_start,
                                   " before the demo"));
    }
  }
  return absl::OkStatus();
}

}  // namespace attnd::workload
