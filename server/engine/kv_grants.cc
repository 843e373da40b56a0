#include "server/engine/kv_grants.h"

#include <sys/random.h>

#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace attnd {
namespace {

absl::StatusOr<std::string> RandomId() {
  std::string id(16, '\0');
  size_t got = 0;
  while (got < id.size()) {
    const ssize_t n = getrandom(id.data() + got, id.size() - got, 0);
    if (n < 0) return absl::InternalError("getrandom failed: no grant id");
    got += static_cast<size_t>(n);
  }
  return id;
}

}  // namespace

absl::StatusOr<std::string> KvGrants::Add(KvGrantSpec spec) {
  absl::StatusOr<std::string> id = RandomId();
  if (!id.ok()) return id.status();
  absl::MutexLock lock(&mu_);
  grants_[*id].spec = std::move(spec);
  return id;
}

absl::StatusOr<OpenedPull> KvGrants::Open(const std::string& grant, int64_t num_tokens,
                                          absl::Time now, absl::Time deadline) {
  absl::MutexLock lock(&mu_);
  auto it = grants_.find(grant);
  // One answer for unknown, expired and used-up grants: a wrong guess learns nothing.
  if (it == grants_.end() || it->second.ended || now >= it->second.spec.expires)
    return absl::NotFoundError("grant: no such grant (unknown, expired, revoked or used up)");
  Grant& g = it->second;
  if (num_tokens == 0) num_tokens = g.spec.num_tokens;
  if (g.spec.max_pulls > 0 && g.finished_pulls + g.open_pulls >= g.spec.max_pulls)
    return absl::ResourceExhaustedError(absl::StrCat(
        "grant: its ", g.spec.max_pulls, " pulls are taken (", g.open_pulls, " open)"));
  if (num_tokens > g.spec.num_tokens)
    return absl::InvalidArgumentError(absl::StrCat(
        "num_tokens: ", num_tokens, " exceeds the grant's ", g.spec.num_tokens, " tokens"));
  const uint64_t id = next_pull_id_++;
  pulls_[id] = Pull{grant, deadline};
  ++g.open_pulls;
  return OpenedPull{id, g.spec.device_index, num_tokens, g.spec.pages};
}

void KvGrants::EndLocked(const std::string& id, std::vector<EndedHold>* out) {
  auto it = grants_.find(id);
  if (it == grants_.end()) return;
  it->second.ended = true;
  if (it->second.open_pulls > 0) return;
  out->push_back({it->second.spec.device_index, std::move(it->second.spec.pages)});
  grants_.erase(it);
}

void KvGrants::ClosePullLocked(uint64_t pull_id, bool completed, std::vector<EndedHold>* out) {
  auto it = pulls_.find(pull_id);
  const std::string grant = std::move(it->second.grant);
  pulls_.erase(it);
  Grant& g = grants_.at(grant);
  --g.open_pulls;
  if (completed) ++g.finished_pulls;
  if (g.ended || (g.spec.max_pulls > 0 && g.finished_pulls >= g.spec.max_pulls))
    EndLocked(grant, out);
}

absl::StatusOr<std::vector<EndedHold>> KvGrants::Close(uint64_t pull_id, bool completed) {
  absl::MutexLock lock(&mu_);
  if (!pulls_.contains(pull_id))
    return absl::NotFoundError(absl::StrCat("pull_id: no open pull ", pull_id));
  std::vector<EndedHold> ended;
  ClosePullLocked(pull_id, completed, &ended);
  return ended;
}

absl::StatusOr<std::vector<EndedHold>> KvGrants::Revoke(uint32_t owner,
                                                        const std::string& grant) {
  absl::MutexLock lock(&mu_);
  auto it = grants_.find(grant);
  if (it == grants_.end() || it->second.spec.owner != owner || it->second.ended)
    return absl::NotFoundError("grant: no such grant of this client");
  std::vector<EndedHold> ended;
  EndLocked(grant, &ended);
  return ended;
}

std::vector<EndedHold> KvGrants::RevokeOwner(uint32_t owner) {
  absl::MutexLock lock(&mu_);
  std::vector<std::string> ids;
  for (const auto& [id, g] : grants_)
    if (g.spec.owner == owner) ids.push_back(id);
  std::vector<EndedHold> ended;
  for (const std::string& id : ids) EndLocked(id, &ended);
  return ended;
}

std::vector<EndedHold> KvGrants::Sweep(absl::Time now) {
  absl::MutexLock lock(&mu_);
  std::vector<EndedHold> ended;
  std::vector<uint64_t> stale;
  for (const auto& [id, p] : pulls_)
    if (now >= p.deadline) stale.push_back(id);
  for (uint64_t id : stale) ClosePullLocked(id, /*completed=*/false, &ended);
  std::vector<std::string> expired;
  for (const auto& [id, g] : grants_)
    if (now >= g.spec.expires) expired.push_back(id);
  for (const std::string& id : expired) EndLocked(id, &ended);
  return ended;
}

std::vector<EndedHold> KvGrants::Clear() {
  absl::MutexLock lock(&mu_);
  std::vector<EndedHold> ended;
  for (auto& [id, g] : grants_) ended.push_back({g.spec.device_index, std::move(g.spec.pages)});
  grants_.clear();
  pulls_.clear();
  return ended;
}

int64_t KvGrants::num_grants() const {
  absl::MutexLock lock(&mu_);
  return static_cast<int64_t>(grants_.size());
}

std::optional<uint64_t> KvGrants::HeldSequenceOn(int device_index) const {
  absl::MutexLock lock(&mu_);
  for (const auto& [id, g] : grants_)
    if (g.spec.device_index == device_index && !g.spec.pages.empty()) return g.spec.seq_id;
  return std::nullopt;
}

int64_t KvGrants::num_open_pulls() const {
  absl::MutexLock lock(&mu_);
  return static_cast<int64_t>(pulls_.size());
}

}  // namespace attnd
