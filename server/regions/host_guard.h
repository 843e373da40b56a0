// The SIGBUS guard for client mappings. A client that shares a POSIX shm object with attnd can
// ftruncate() it afterwards; attnd's next access to a page past the new end then raises SIGBUS,
// which would kill the server and every other client's work with it. POSIX shm cannot be sealed
// against shrinking (memfd seals can, but shm_open names are what the wire carries), so attnd
// makes the fault harmless itself, the way Wayland compositors guard their wl_shm pools.
//
// Every mapping of client memory is registered here for as long as it is mapped. When a SIGBUS
// lands inside one, the handler replaces the whole mapping with anonymous zero memory at the
// same address and marks it damaged: the faulting access retries and succeeds (reads give
// zeros, writes go to private memory the client never sees), and whoever owns the mapping
// checks damaged() after its work and refuses the result. A SIGBUS anywhere else goes to the
// handler that was there before (absl's failure handler in attnd), or kills the process as it
// would have without the guard.
#ifndef ATTND_SERVER_REGIONS_HOST_GUARD_H_
#define ATTND_SERVER_REGIONS_HOST_GUARD_H_

#include <cstddef>
#include <cstdint>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace attnd {

// How many mappings may be guarded at once. Generous on purpose: the engine already limits
// regions per client, and a slot costs 32 bytes of address space that is only touched when
// used (2 MiB for the table).
inline constexpr size_t kGuardedMappingCapacity = 64 * 1024;

// Installs the process-wide SIGBUS handler, remembering the action it replaces so that faults
// outside every guarded mapping keep their old fate. Idempotent and thread-safe: the first call
// installs, later calls return the first call's outcome. Install after any handler the guard
// should chain to (attnd's main installs absl's failure handler first, then this).
absl::Status InstallHostGuard();

// One guarded range of client memory: registered on creation, unregistered on destruction.
// The owner must unregister (destroy this, or call Unregister) BEFORE it munmaps the range.
// The other order leaves a moment where the range is free but still registered: another
// thread's mmap may then reuse those addresses, and a SIGBUS in that unrelated mapping (or a
// handler still running for the old one) would overwrite it with zeros. Unregistering first is
// safe because nothing may touch the mapping once its owner is tearing it down: every reader
// holds the owner (a Region's shared_ptr) while it reads.
class GuardedMapping {
 public:
  // Installs the guard if needed and registers [begin, begin + bytes). INVALID_ARGUMENT for a
  // null or empty range; RESOURCE_EXHAUSTED when all kGuardedMappingCapacity slots are taken.
  static absl::StatusOr<GuardedMapping> Register(void* begin, size_t bytes);

  GuardedMapping() = default;  // guards nothing
  GuardedMapping(GuardedMapping&& other) noexcept : slot_(other.slot_) { other.slot_ = -1; }
  GuardedMapping& operator=(GuardedMapping&& other) noexcept;
  GuardedMapping(const GuardedMapping&) = delete;
  GuardedMapping& operator=(const GuardedMapping&) = delete;
  ~GuardedMapping() { Unregister(); }

  // Stops guarding the range (idempotent). Call before munmap; see the class comment.
  void Unregister();

  // True once a SIGBUS hit the range: it shrank under attnd, the whole range was replaced by
  // anonymous memory, and every byte read from it since the fault was zero (or what attnd
  // itself wrote there after the fault). Sticky: the client's memory is not reachable through
  // this mapping any more, so it has to be registered again.
  bool damaged() const;

 private:
  explicit GuardedMapping(int slot) : slot_(slot) {}

  int slot_ = -1;  // index in the guard's table; -1 when guarding nothing
};

}  // namespace attnd

#endif  // ATTND_SERVER_REGIONS_HOST_GUARD_H_
