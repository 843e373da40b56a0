// Client IPC events by name: opened once at registration (on the owning device's worker) and
// shared by the requests that wait on or signal them. Unregistering removes the name at once;
// the event is destroyed after the last request holding it is done.
#ifndef ATTND_SERVER_REGIONS_EVENT_REGISTRY_H_
#define ATTND_SERVER_REGIONS_EVENT_REGISTRY_H_

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"

namespace attnd {

// An event another process shares with this one (a cudaEvent_t opened from its IPC handle).
class IpcEvent {
 public:
  virtual ~IpcEvent() = default;
  virtual int device() const = 0;
  virtual void* event() const = 0;  // the platform's event handle (cudaEvent_t)
};

// The events one request names, resolved: handles for the backend, and the owners that keep
// them open until the request's GPU work is done.
struct ResolvedEvents {
  void* wait = nullptr;
  void* signal = nullptr;
  std::vector<std::shared_ptr<IpcEvent>> owners;
};

// Names are per client: `owner` (0 for in-process callers) sees and touches only its own.
class EventRegistry {
 public:
  // ALREADY_EXISTS if the owner already has an event of that name.
  absl::Status Add(const std::string& name, std::shared_ptr<IpcEvent> event, uint32_t owner = 0);
  // NOT_FOUND if the owner has no such name.
  absl::Status Remove(const std::string& name, uint32_t owner = 0);
  bool Contains(const std::string& name, uint32_t owner = 0) const;
  // Resolves a request's wait and signal events (either may be empty) for a call on `device`;
  // the messages name sync.wait_event / sync.signal_event.
  absl::StatusOr<ResolvedEvents> Resolve(const std::string& wait_event,
                                         const std::string& signal_event, int device,
                                         uint32_t owner = 0) const;
  // Removes every event of `owner`; returns how many.
  int64_t RemoveOwner(uint32_t owner);
  // Drops every event (at shutdown, while the device workers still run).
  void Clear();

 private:
  mutable absl::Mutex mu_;
  using Key = std::pair<uint32_t, std::string>;  // (owner, name)
  absl::flat_hash_map<Key, std::shared_ptr<IpcEvent>> events_ ABSL_GUARDED_BY(mu_);
};

}  // namespace attnd

#endif  // ATTND_SERVER_REGIONS_EVENT_REGISTRY_H_
