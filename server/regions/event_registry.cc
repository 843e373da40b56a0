#include "server/regions/event_registry.h"

#include <tuple>

#include "absl/strings/str_cat.h"

namespace attnd {

absl::Status EventRegistry::Add(const std::string& name, std::shared_ptr<IpcEvent> event,
                                uint32_t owner) {
  absl::MutexLock lock(&mu_);
  if (!events_.try_emplace(Key{owner, name}, std::move(event)).second)
    return absl::AlreadyExistsError(
        absl::StrCat("name: a CUDA event named '", name, "' is already registered"));
  return absl::OkStatus();
}

absl::Status EventRegistry::Remove(const std::string& name, uint32_t owner) {
  std::shared_ptr<IpcEvent> removed;  // destroyed off the lock: closing posts to a worker
  absl::MutexLock lock(&mu_);
  auto it = events_.find(Key{owner, name});
  if (it == events_.end())
    return absl::NotFoundError(absl::StrCat("name: no CUDA event named '", name, "'"));
  removed = std::move(it->second);
  events_.erase(it);
  return absl::OkStatus();
}

bool EventRegistry::Contains(const std::string& name, uint32_t owner) const {
  absl::MutexLock lock(&mu_);
  return events_.contains(Key{owner, name});
}

int64_t EventRegistry::RemoveOwner(uint32_t owner) {
  std::vector<std::shared_ptr<IpcEvent>> removed;  // destroyed off the lock
  absl::MutexLock lock(&mu_);
  for (auto it = events_.begin(); it != events_.end();) {
    if (it->first.first == owner) {
      removed.push_back(std::move(it->second));
      events_.erase(it++);
    } else {
      ++it;
    }
  }
  return static_cast<int64_t>(removed.size());
}

absl::StatusOr<ResolvedEvents> EventRegistry::Resolve(const std::string& wait_event,
                                                      const std::string& signal_event,
                                                      int device, uint32_t owner) const {
  ResolvedEvents out;
  absl::MutexLock lock(&mu_);
  for (auto [name, field, slot] : {std::tuple{&wait_event, "sync.wait_event", &out.wait},
                                   std::tuple{&signal_event, "sync.signal_event", &out.signal}}) {
    if (name->empty()) continue;
    auto it = events_.find(Key{owner, *name});
    if (it == events_.end())
      return absl::NotFoundError(absl::StrCat(field, ": no CUDA event named '", *name, "'"));
    if (it->second->device() != device)
      return absl::InvalidArgumentError(absl::StrCat(field, ": event '", *name,
                                                     "' lives on device ", it->second->device(),
                                                     "; the request runs on ", device));
    *slot = it->second->event();
    out.owners.push_back(it->second);
  }
  return out;
}

void EventRegistry::Clear() {
  absl::flat_hash_map<Key, std::shared_ptr<IpcEvent>> dropped;
  {
    absl::MutexLock lock(&mu_);
    dropped.swap(events_);
  }
}

}  // namespace attnd
