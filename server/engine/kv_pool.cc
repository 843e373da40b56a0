#include "server/engine/kv_pool.h"

#include <algorithm>
#include <tuple>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"

namespace attnd {

int64_t Sequence::MaxLength() const {
  return lengths.empty() ? 0 : *std::max_element(lengths.begin(), lengths.end());
}

KvPool::KvPool(int device, int64_t num_pages, int64_t num_layers, int64_t page_size,
               int64_t max_seq_len)
    : device_(device),
      num_layers_(num_layers),
      page_size_(page_size),
      max_seq_len_(max_seq_len),
      refcounts_(static_cast<size_t>(num_pages), 0),
      page_principal_(static_cast<size_t>(num_pages), 0) {
  free_list_.reserve(static_cast<size_t>(num_pages));
  for (int64_t p = num_pages - 1; p >= 0; --p) free_list_.push_back(static_cast<int32_t>(p));
}

int32_t KvPool::AllocatePage(uint32_t principal) {
  int32_t page = free_list_.back();
  free_list_.pop_back();
  refcounts_[page] = 1;
  page_principal_[page] = principal;
  ++principal_usage_[principal].pages;
  return page;
}

bool KvPool::ReleasePage(int32_t page) {
  if (--refcounts_[page] > 0) return false;
  free_list_.push_back(page);
  --principal_usage_[page_principal_[page]].pages;
  return true;
}

absl::Status KvPool::CheckPageQuota(uint32_t principal, int64_t needed) const {
  if (max_pages_per_principal_ == 0 || needed == 0) return absl::OkStatus();
  auto it = principal_usage_.find(principal);
  const int64_t held = it == principal_usage_.end() ? 0 : it->second.pages;
  if (held + needed <= max_pages_per_principal_) return absl::OkStatus();
  return absl::ResourceExhaustedError(absl::StrCat(
      "device ", device_, ": the request needs ", needed, " more pages; this client holds ", held,
      " of its quota of ", max_pages_per_principal_, " (--max_pages_per_client)"));
}

absl::Status KvPool::CheckPagesAvailable(uint32_t principal, int64_t needed,
                                         const char* what) const {
  if (absl::Status s = CheckPageQuota(principal, needed); !s.ok()) return s;
  if (needed > free_pages())
    return absl::ResourceExhaustedError(absl::StrCat("device ", device_, ": the ", what,
                                                     " needs ", needed, " free pages, ",
                                                     free_pages(), " are free of ",
                                                     total_pages()));
  return absl::OkStatus();
}

absl::Status KvPool::Create(uint64_t id, uint32_t owner, uint32_t principal) {
  if (sequences_.contains({owner, id}))
    return absl::AlreadyExistsError(
        absl::StrCat("seq_id: sequence ", id, " already exists on device ", device_));
  OwnerUsage& usage = principal_usage_[principal];
  if (max_sequences_per_principal_ > 0 && usage.sequences >= max_sequences_per_principal_)
    return absl::ResourceExhaustedError(absl::StrCat(
        "seq_id: this client already holds ", usage.sequences, " sequences on device ", device_,
        ", its quota (--max_sequences_per_client)"));
  auto seq = std::make_unique<Sequence>();
  seq->id = id;
  seq->owner = owner;
  seq->principal = principal;
  seq->lengths.assign(static_cast<size_t>(num_layers_), 0);
  sequences_.emplace(SeqKey{owner, id}, std::move(seq));
  ++usage.sequences;
  ++table_epoch_;
  return absl::OkStatus();
}

absl::Status KvPool::Fork(uint64_t parent, uint64_t child, uint32_t owner) {
  const Sequence* src = Find(parent, owner);
  if (src == nullptr)
    return absl::NotFoundError(
        absl::StrCat("parent_id: no sequence ", parent, " on device ", device_));
  if (sequences_.contains({owner, child}))
    return absl::AlreadyExistsError(
        absl::StrCat("child_id: sequence ", child, " already exists on device ", device_));
  OwnerUsage& usage = principal_usage_[src->principal];
  if (max_sequences_per_principal_ > 0 && usage.sequences >= max_sequences_per_principal_)
    return absl::ResourceExhaustedError(absl::StrCat(
        "child_id: this client already holds ", usage.sequences, " sequences on device ",
        device_, ", its quota (--max_sequences_per_client)"));
  auto seq = std::make_unique<Sequence>(*src);
  seq->id = child;
  for (int32_t page : seq->pages) ++refcounts_[page];
  sequences_.emplace(SeqKey{owner, child}, std::move(seq));
  ++usage.sequences;
  ++table_epoch_;
  return absl::OkStatus();
}

absl::Status KvPool::Truncate(uint64_t id, int64_t length, uint32_t owner) {
  auto it = sequences_.find(SeqKey{owner, id});
  if (it == sequences_.end())
    return absl::NotFoundError(absl::StrCat("seq_id: no sequence ", id, " on device ", device_));
  if (length < 0) return absl::InvalidArgumentError("length: must be >= 0");
  Sequence& seq = *it->second;
  for (int64_t& len : seq.lengths) len = std::min(len, length);
  DropPagesPastLongestLayer(seq);
  return absl::OkStatus();
}

void KvPool::DropPagesPastLongestLayer(Sequence& seq) {
  const size_t keep = static_cast<size_t>(PagesFor(seq.MaxLength()));
  if (seq.pages.size() <= keep) return;
  // Last page first: the free list is a stack, so the pages come back out in table order.
  for (size_t i = seq.pages.size(); i > keep; --i) ReleasePage(seq.pages[i - 1]);
  seq.pages.resize(keep);
  ++table_epoch_;
}

absl::StatusOr<int64_t> KvPool::Release(uint64_t id, uint32_t owner) {
  auto it = sequences_.find(SeqKey{owner, id});
  if (it == sequences_.end())
    return absl::NotFoundError(absl::StrCat("seq_id: no sequence ", id, " on device ", device_));
  int64_t freed = 0;
  // Last page first: the next sequence gets these pages in the order this one had them, so
  // pages stay consecutive and a KV pull merges them into long runs.
  const std::vector<int32_t>& pages = it->second->pages;
  for (auto page = pages.rbegin(); page != pages.rend(); ++page) freed += ReleasePage(*page) ? 1 : 0;
  --principal_usage_[it->second->principal].sequences;
  sequences_.erase(it);
  ++table_epoch_;
  return freed;
}

OwnerUsage KvPool::ReleaseOwner(uint32_t owner) {
  OwnerUsage released;
  for (const Sequence* seq : ListOwned(owner)) {
    released.pages += *Release(seq->id, owner);
    ++released.sequences;
  }
  return released;
}

OwnerUsage KvPool::UsageOf(uint32_t owner) const {
  OwnerUsage usage;
  absl::flat_hash_set<int32_t> pages;
  for (const Sequence* seq : ListOwned(owner)) {
    ++usage.sequences;
    pages.insert(seq->pages.begin(), seq->pages.end());
  }
  usage.pages = static_cast<int64_t>(pages.size());
  return usage;
}

const Sequence* KvPool::Find(uint64_t id, uint32_t owner) const {
  auto it = sequences_.find(SeqKey{owner, id});
  return it == sequences_.end() ? nullptr : it->second.get();
}

int64_t KvPool::SharedPages(const Sequence& seq) const {
  return std::count_if(seq.pages.begin(), seq.pages.end(),
                       [this](int32_t p) { return refcounts_[p] > 1; });
}

std::vector<const Sequence*> KvPool::List() const {
  std::vector<const Sequence*> out;
  out.reserve(sequences_.size());
  for (const auto& [id, seq] : sequences_) out.push_back(seq.get());
  std::sort(out.begin(), out.end(), [](const Sequence* a, const Sequence* b) {
    return std::tie(a->owner, a->id) < std::tie(b->owner, b->id);
  });
  return out;
}

std::vector<const Sequence*> KvPool::ListOwned(uint32_t owner) const {
  std::vector<const Sequence*> out;
  for (const auto& [key, seq] : sequences_)
    if (key.first == owner) out.push_back(seq.get());
  std::sort(out.begin(), out.end(),
            [](const Sequence* a, const Sequence* b) { return a->id < b->id; });
  return out;
}

absl::StatusOr<std::vector<PageCopy>> KvPool::ReserveAppend(int64_t layer,
                                                            absl::Span<const AppendItem> items,
                                                            std::vector<int64_t>* starts,
                                                            uint32_t owner) {
  auto prepared = PrepareAppend(layer, items, owner);
  if (!prepared.ok()) return prepared.status();
  auto copies = CommitAppend(*prepared);
  if (copies.ok()) *starts = std::move(prepared->starts);
  return copies;
}

absl::StatusOr<PreparedAppend> KvPool::PrepareAppend(int64_t layer,
                                                     absl::Span<const AppendItem> items,
                                                     uint32_t owner) {
  if (layer < 0 || layer >= num_layers_)
    return absl::InvalidArgumentError(
        absl::StrCat("layer: ", layer, " is out of range [0, ", num_layers_, ")"));
  PreparedAppend prepared;
  prepared.layer = layer;
  prepared.sequences.reserve(items.size());
  prepared.starts.reserve(items.size());
  prepared.num_new.reserve(items.size());
  absl::flat_hash_set<uint64_t> seen;
  for (size_t i = 0; i < items.size(); ++i) {
    const AppendItem& item = items[i];
    auto it = sequences_.find(SeqKey{owner, item.seq_id});
    if (it == sequences_.end())
      return absl::NotFoundError(absl::StrCat("items[", i, "].seq_id: no sequence ", item.seq_id,
                                              " on device ", device_));
    if (!seen.insert(item.seq_id).second)
      return absl::InvalidArgumentError(absl::StrCat(
          "items[", i, "].seq_id: sequence ", item.seq_id, " appears twice in one batch"));
    Sequence* seq = it->second.get();
    const int64_t start = seq->lengths[static_cast<size_t>(layer)];
    if (item.expected_length.has_value() && *item.expected_length != start)
      return absl::FailedPreconditionError(absl::StrCat(
          "items[", i, "].expected_length: sequence ", item.seq_id, " holds ", start,
          " tokens at layer ", layer, ", not ", *item.expected_length, "; nothing was changed"));
    if (item.num_new_tokens > max_seq_len_ - start)
      return absl::InvalidArgumentError(absl::StrCat(
          "items[", i, "].num_new_tokens: sequence ", item.seq_id, " holds ", start,
          " tokens at layer ", layer, "; ", item.num_new_tokens, " more exceed max_seq_len ",
          max_seq_len_));
    prepared.sequences.push_back(seq);
    prepared.starts.push_back(start);
    prepared.num_new.push_back(item.num_new_tokens);
  }
  return prepared;
}

absl::StatusOr<std::vector<PageCopy>> KvPool::CommitAppend(const PreparedAppend& prepared) {
  std::vector<ResolvedWrite> writes;
  writes.reserve(prepared.sequences.size());
  for (size_t i = 0; i < prepared.sequences.size(); ++i)
    writes.push_back({prepared.sequences[i], prepared.layer, prepared.starts[i], prepared.num_new[i]});
  return Reserve(writes);
}

void KvPool::UndoAppend(const PreparedAppend& prepared) {
  for (size_t i = 0; i < prepared.sequences.size(); ++i) {
    Sequence& seq = *prepared.sequences[i];
    seq.lengths[static_cast<size_t>(prepared.layer)] = prepared.starts[i];
    DropPagesPastLongestLayer(seq);
  }
}

absl::StatusOr<std::vector<PageCopy>> KvPool::ReserveWrites(absl::Span<const PageWrite> writes,
                                                            uint32_t owner) {
  std::vector<ResolvedWrite> resolved;
  resolved.reserve(writes.size());
  absl::flat_hash_set<std::pair<uint64_t, int64_t>> seen;
  for (const PageWrite& w : writes) {
    auto it = sequences_.find(SeqKey{owner, w.seq_id});
    if (it == sequences_.end())
      return absl::NotFoundError(
          absl::StrCat("seq_id: no sequence ", w.seq_id, " on device ", device_));
    if (!seen.insert({w.seq_id, w.layer}).second)
      return absl::InvalidArgumentError(
          absl::StrCat("sequence ", w.seq_id, " is written twice at layer ", w.layer));
    resolved.push_back({it->second.get(), w.layer, w.start, w.n});
  }
  return Reserve(resolved);
}

absl::StatusOr<std::vector<PageCopy>> KvPool::Reserve(absl::Span<const ResolvedWrite> writes) {
  // Plan: count fresh pages and copies of shared pages without changing anything. A shared
  // page that two writes of this batch both touch is copied once per writer until only one
  // owner is left, so track planned releases.
  absl::flat_hash_map<int32_t, int32_t> planned_releases;
  // Page-table sizes as planned so far: several writes (layers) of one sequence share pages.
  absl::flat_hash_map<const Sequence*, int64_t> planned_pages;
  int64_t needed = 0;
  for (const ResolvedWrite& w : writes) {
    if (w.n <= 0) continue;
    const Sequence& seq = *w.seq;
    const int64_t first = w.start / page_size_;
    const int64_t last = (w.start + w.n - 1) / page_size_;
    const int64_t have = static_cast<int64_t>(seq.pages.size());
    int64_t& planned = planned_pages.try_emplace(&seq, have).first->second;
    for (int64_t p = first; p <= std::min(last, have - 1); ++p) {
      const int32_t page = seq.pages[static_cast<size_t>(p)];
      int32_t& released = planned_releases[page];
      if (refcounts_[page] - released > 1) {
        ++released;
        ++needed;
      }
    }
    needed += std::max<int64_t>(0, last + 1 - planned);
    planned = std::max(planned, last + 1);
  }
  // A call's writes are all one owner's, so one principal pays for them.
  const uint32_t principal = writes.empty() ? 0 : writes.front().seq->principal;
  if (absl::Status s = CheckPagesAvailable(principal, needed, "request"); !s.ok()) return s;
  // Commit.
  std::vector<PageCopy> copies;
  for (const ResolvedWrite& w : writes) {
    Sequence& seq = *w.seq;
    if (w.n <= 0) continue;
    const int64_t first = w.start / page_size_;
    const int64_t last = (w.start + w.n - 1) / page_size_;
    for (int64_t p = first; p <= last; ++p) {
      if (p < static_cast<int64_t>(seq.pages.size())) {
        int32_t& page = seq.pages[static_cast<size_t>(p)];
        if (refcounts_[page] > 1) {
          const int32_t fresh = AllocatePage(seq.principal);
          copies.push_back({page, fresh});
          ReleasePage(page);
          page = fresh;
          ++table_epoch_;
        }
      } else {
        seq.pages.push_back(AllocatePage(seq.principal));
        ++table_epoch_;
      }
    }
    int64_t& len = seq.lengths[static_cast<size_t>(w.layer)];
    len = std::max(len, w.start + w.n);
  }
  return copies;
}

absl::StatusOr<std::vector<int32_t>> KvPool::Hold(uint64_t id, int64_t num_tokens,
                                                  uint32_t owner) {
  const Sequence* seq = Find(id, owner);
  if (seq == nullptr)
    return absl::NotFoundError(absl::StrCat("seq_id: no sequence ", id, " on device ", device_));
  for (int64_t layer = 0; layer < num_layers_; ++layer) {
    if (seq->lengths[layer] < num_tokens)
      return absl::FailedPreconditionError(
          absl::StrCat("num_tokens: ", num_tokens, " exceeds the ", seq->lengths[layer],
                       " tokens sequence ", id, " holds at layer ", layer));
  }
  std::vector<int32_t> held(seq->pages.begin(), seq->pages.begin() + PagesFor(num_tokens));
  for (int32_t page : held) ++refcounts_[page];
  return held;
}

int64_t KvPool::DropPages(absl::Span<const int32_t> pages) {
  int64_t freed = 0;
  for (auto page = pages.rbegin(); page != pages.rend(); ++page) freed += ReleasePage(*page) ? 1 : 0;
  return freed;
}

absl::StatusOr<std::vector<int32_t>> KvPool::AllocateDetached(int64_t count,
                                                              uint32_t principal) {
  if (absl::Status s = CheckPagesAvailable(principal, count, "pull"); !s.ok()) return s;
  std::vector<int32_t> pages;
  pages.reserve(static_cast<size_t>(count));
  for (int64_t i = 0; i < count; ++i) pages.push_back(AllocatePage(principal));
  return pages;
}

absl::Status KvPool::CheckAdoptable(uint64_t id, uint32_t owner, uint32_t principal) const {
  const Sequence* seq = Find(id, owner);
  if (seq == nullptr) {
    auto it = principal_usage_.find(principal);
    const int64_t held = it == principal_usage_.end() ? 0 : it->second.sequences;
    if (max_sequences_per_principal_ > 0 && held >= max_sequences_per_principal_)
      return absl::ResourceExhaustedError(absl::StrCat(
          "seq_id: this client already holds ", held, " sequences on device ", device_,
          ", its quota (--max_sequences_per_client)"));
    return absl::OkStatus();
  }
  if (!seq->pages.empty() || seq->MaxLength() > 0)
    return absl::FailedPreconditionError(absl::StrCat(
        "seq_id: sequence ", id, " on device ", device_, " holds ", seq->MaxLength(),
        " tokens; a pull fills a new or empty sequence"));
  return absl::OkStatus();
}

absl::Status KvPool::Adopt(uint64_t id, uint32_t owner, uint32_t principal,
                           std::vector<int32_t> pages, int64_t layer_begin, int64_t layer_end,
                           int64_t num_tokens) {
  if (absl::Status s = CheckAdoptable(id, owner, principal); !s.ok()) return s;
  if (Find(id, owner) == nullptr) {
    if (absl::Status s = Create(id, owner, principal); !s.ok()) return s;
  }
  Sequence& seq = *sequences_.at(SeqKey{owner, id});
  seq.pages = std::move(pages);
  for (int64_t layer = layer_begin; layer < layer_end; ++layer) seq.lengths[layer] = num_tokens;
  ++table_epoch_;
  return absl::OkStatus();
}

}  // namespace attnd
