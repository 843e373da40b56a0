// Grants: a sequence's owner lets peer attnd processes pull positions [0, num_tokens) of it.
// A grant holds the pages as they were when it was made (KvPool::Hold) until it ends: at its
// deadline, when revoked, after its last allowed pull, or when its owner's lease ends; an
// ended grant's pages go back once no pull of it is open. The grant id is an unguessable
// capability: whoever holds it (and may call OpenKvPull, --kv_peers) may read those pages.
// Thread-safe; knows nothing of devices beyond an index.
#ifndef ATTND_SERVER_ENGINE_KV_GRANTS_H_
#define ATTND_SERVER_ENGINE_KV_GRANTS_H_

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace attnd {

struct KvGrantSpec {
  uint32_t owner = 0;        // the client that made it
  int device_index = 0;
  uint64_t seq_id = 0;
  int64_t num_tokens = 0;
  std::vector<int32_t> pages;  // held: page ids of positions [0, num_tokens)
  absl::Time expires;
  uint32_t max_pulls = 0;    // 0: no limit
};

// An open pull of a grant: what the puller may read.
struct OpenedPull {
  uint64_t pull_id = 0;
  int device_index = 0;
  int64_t num_tokens = 0;
  std::vector<int32_t> pages;
};

// Pages whose hold has ended, to drop on the device's worker.
struct EndedHold {
  int device_index = 0;
  std::vector<int32_t> pages;
};

class KvGrants {
 public:
  // Stores the grant; returns its id (16 random bytes).
  absl::StatusOr<std::string> Add(KvGrantSpec spec);
  // Opens a pull of num_tokens (<= the grant's) that must close by `deadline`.
  absl::StatusOr<OpenedPull> Open(const std::string& grant, int64_t num_tokens, absl::Time now,
                                  absl::Time deadline);
  // Closes a pull; `completed` counts it against max_pulls. NOT_FOUND for an unknown id.
  absl::StatusOr<std::vector<EndedHold>> Close(uint64_t pull_id, bool completed);
  // Ends a grant of `owner` now (its open pulls finish first).
  absl::StatusOr<std::vector<EndedHold>> Revoke(uint32_t owner, const std::string& grant);
  // Ends every grant of `owner` (its lease ended, or ReleaseAll).
  std::vector<EndedHold> RevokeOwner(uint32_t owner);
  // Ends grants past their deadline and closes pulls past theirs (a puller that vanished).
  std::vector<EndedHold> Sweep(absl::Time now);
  // Ends everything (shutdown).
  std::vector<EndedHold> Clear();

  int64_t num_grants() const;
  int64_t num_open_pulls() const;
  // The sequence of a grant (ended or not) that still holds pages of the device, if any.
  std::optional<uint64_t> HeldSequenceOn(int device_index) const;

 private:
  struct Grant {
    KvGrantSpec spec;
    int64_t open_pulls = 0;
    uint32_t finished_pulls = 0;
    bool ended = false;  // no more pulls; the hold drops with the last open one
  };
  struct Pull {
    std::string grant;
    absl::Time deadline;
  };
  // Marks the grant ended; moves its hold to `out` once no pull is open.
  void EndLocked(const std::string& id, std::vector<EndedHold>* out)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void ClosePullLocked(uint64_t pull_id, bool completed, std::vector<EndedHold>* out)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  mutable absl::Mutex mu_;
  absl::flat_hash_map<std::string, Grant> grants_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<uint64_t, Pull> pulls_ ABSL_GUARDED_BY(mu_);
  uint64_t next_pull_id_ ABSL_GUARDED_BY(mu_) = 1;
};

}  // namespace attnd

#endif  // ATTND_SERVER_ENGINE_KV_GRANTS_H_
