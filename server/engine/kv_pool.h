// The bookkeeping of one device's KV pool: which pages are free, which sequences own which
// pages (refcounted, so forks share them), and each sequence's length per layer. Plain C++: it
// moves no KV bytes. It tells the backend which pages to copy before a write (copy-on-write).
// Not thread-safe: one device worker owns it.
#ifndef ATTND_SERVER_ENGINE_KV_POOL_H_
#define ATTND_SERVER_ENGINE_KV_POOL_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "server/platform/page_copy.h"

namespace attnd {

// Sequences belong to a client (`owner`): a client's ids name only its own sequences. Pages and
// sequences count against the owner's quota group (`principal`: a uid or a token's name, with
// all its `attnd-client` instances). The in-process default is owner 0, principal 0.
struct Sequence {
  uint64_t id = 0;
  uint32_t owner = 0;
  uint32_t principal = 0;
  std::vector<int32_t> pages;    // page ids of positions [0, pages.size() * page_size)
  std::vector<int64_t> lengths;  // tokens per layer
  int64_t MaxLength() const;
};

// Positions [start, start + n) of `layer` of sequence `seq_id` are about to be written.
struct PageWrite {
  uint64_t seq_id;  // of the owner ReserveWrites is given
  int64_t layer;
  int64_t start;
  int64_t n;
};

struct AppendItem {
  uint64_t seq_id;
  int64_t num_new_tokens;
  // When set, the sequence must hold exactly this many tokens at the layer before the append.
  std::optional<int64_t> expected_length = std::nullopt;
};

// A batch's append checked against the pool but not applied: each item's sequence and the
// position its new tokens start at. Valid until the pool next changes.
struct PreparedAppend {
  int64_t layer = 0;
  std::vector<Sequence*> sequences;
  std::vector<int64_t> starts;
  std::vector<int64_t> num_new;
};

// What one owner holds in a pool.
struct OwnerUsage {
  int64_t sequences = 0;
  int64_t pages = 0;  // distinct pages its sequences hold
};

class KvPool {
 public:
  KvPool(int device, int64_t num_pages, int64_t num_layers, int64_t page_size,
         int64_t max_seq_len);

  // Per-principal quotas in this pool; 0: none. A request past one is RESOURCE_EXHAUSTED and
  // changes nothing.
  void SetQuotas(int64_t max_sequences, int64_t max_pages) {
    max_sequences_per_principal_ = max_sequences;
    max_pages_per_principal_ = max_pages;
  }

  int64_t total_pages() const { return static_cast<int64_t>(refcounts_.size()); }
  int64_t free_pages() const { return static_cast<int64_t>(free_list_.size()); }
  int64_t used_pages() const { return total_pages() - free_pages(); }
  int64_t num_sequences() const { return static_cast<int64_t>(sequences_.size()); }
  int64_t page_size() const { return page_size_; }
  int64_t num_layers() const { return num_layers_; }

  absl::Status Create(uint64_t id, uint32_t owner = 0, uint32_t principal = 0);
  // The child gets the parent's page table and lengths; every page becomes shared. A shared
  // page is copied when either side first writes into it, so fork itself needs no free page.
  absl::Status Fork(uint64_t parent, uint64_t child, uint32_t owner = 0);
  // Each layer keeps min(length, its length) tokens; pages past the longest layer are released.
  absl::Status Truncate(uint64_t id, int64_t length, uint32_t owner = 0);
  // Returns how many pages went back to the free list.
  absl::StatusOr<int64_t> Release(uint64_t id, uint32_t owner = 0);
  // Releases every sequence of `owner`; returns how many, and the pages freed.
  OwnerUsage ReleaseOwner(uint32_t owner);
  OwnerUsage UsageOf(uint32_t owner) const;

  const Sequence* Find(uint64_t id, uint32_t owner = 0) const;
  // Changes whenever any sequence's page table does (a page added, replaced by its copy,
  // dropped; a sequence created, forked or released), never otherwise; starts at 1. A caller
  // that saw the same epoch and the same tables (by address and size) before has the same ids.
  uint64_t table_epoch() const { return table_epoch_; }
  int64_t SharedPages(const Sequence& seq) const;
  // Every sequence, or only `owner`'s; by id.
  std::vector<const Sequence*> List() const;
  std::vector<const Sequence*> ListOwned(uint32_t owner) const;

  // Grows each item's sequence by num_new_tokens at `layer`, all or nothing: every item is
  // checked (exists, appears once, stays within max_seq_len) and every page the batch needs is
  // counted before anything changes. Returns the item's start positions in `starts` and the
  // copies the backend must make before writing.
  absl::StatusOr<std::vector<PageCopy>> ReserveAppend(int64_t layer,
                                                      absl::Span<const AppendItem> items,
                                                      std::vector<int64_t>* starts,
                                                      uint32_t owner = 0);

  // The two halves of ReserveAppend, so a caller can plan the batch in between with each
  // sequence looked up once: Prepare checks every item and changes nothing; Commit reserves
  // the pages (all or nothing) and grows the lengths.
  absl::StatusOr<PreparedAppend> PrepareAppend(int64_t layer, absl::Span<const AppendItem> items,
                                               uint32_t owner = 0);
  absl::StatusOr<std::vector<PageCopy>> CommitAppend(const PreparedAppend& prepared);
  // Takes a committed append back: each sequence's length at the layer returns to its start and
  // pages past the longest layer are released (copies made for the writes stay, as copies).
  void UndoAppend(const PreparedAppend& prepared);

  // The general form: each write may start anywhere up to its layer's length; the layer's
  // length becomes max(length, start + n). Sequences must exist and each (seq, layer) appear
  // once.
  absl::StatusOr<std::vector<PageCopy>> ReserveWrites(absl::Span<const PageWrite> writes,
                                                      uint32_t owner = 0);

  // ---- KV transfer between attnd processes ----
  // A grant's hold on the pages of positions [0, num_tokens) of a sequence: each page gets one
  // more reference, so it stays allocated when the sequence lets go of it and, since a write
  // into a shared page copies it first, keeps its bytes. Every layer must hold num_tokens.
  absl::StatusOr<std::vector<int32_t>> Hold(uint64_t id, int64_t num_tokens, uint32_t owner = 0);
  // Drops one reference of each page (a hold's, or detached pages'); returns the pages freed.
  int64_t DropPages(absl::Span<const int32_t> pages);
  // `count` pages in no sequence (an incoming pull writes them), all or nothing, counted
  // against `principal`'s quota.
  absl::StatusOr<std::vector<int32_t>> AllocateDetached(int64_t count, uint32_t principal);
  // Checks that detached pages could be given to sequence `id` of `owner`: it is absent (it
  // would be created) or holds no token.
  absl::Status CheckAdoptable(uint64_t id, uint32_t owner, uint32_t principal) const;
  // Gives detached pages to sequence `id` (created when absent; it must hold no token): layers
  // [layer_begin, layer_end) hold num_tokens tokens, the others none.
  absl::Status Adopt(uint64_t id, uint32_t owner, uint32_t principal, std::vector<int32_t> pages,
                     int64_t layer_begin, int64_t layer_end, int64_t num_tokens);

 private:
  // A write whose sequence has been looked up.
  struct ResolvedWrite {
    Sequence* seq;
    int64_t layer;
    int64_t start;
    int64_t n;
  };
  absl::StatusOr<std::vector<PageCopy>> Reserve(absl::Span<const ResolvedWrite> writes);
  using SeqKey = std::pair<uint32_t, uint64_t>;  // (owner, id)

  int32_t AllocatePage(uint32_t principal);
  // Returns true if the page went back to the free list.
  bool ReleasePage(int32_t page);
  absl::Status CheckPageQuota(uint32_t principal, int64_t needed) const;
  // The quota, then the free list: RESOURCE_EXHAUSTED naming what (a "request", a "pull") needs.
  absl::Status CheckPagesAvailable(uint32_t principal, int64_t needed, const char* what) const;
  // Releases the pages past what the sequence's longest layer needs (truncate, undo).
  void DropPagesPastLongestLayer(Sequence& seq);
  int64_t PagesFor(int64_t tokens) const { return (tokens + page_size_ - 1) / page_size_; }

  int device_;
  int64_t num_layers_;
  int64_t page_size_;
  int64_t max_seq_len_;
  std::vector<int32_t> refcounts_;
  std::vector<int32_t> free_list_;  // a stack; low page ids are handed out first
  std::vector<uint32_t> page_principal_;  // whose quota a used page counts against
  absl::flat_hash_map<SeqKey, std::unique_ptr<Sequence>> sequences_;
  absl::flat_hash_map<uint32_t, OwnerUsage> principal_usage_;
  int64_t max_sequences_per_principal_ = 0;
  int64_t max_pages_per_principal_ = 0;
  uint64_t table_epoch_ = 1;
};

}  // namespace attnd

#endif  // ATTND_SERVER_ENGINE_KV_POOL_H_
