// POSIX shared memory a client fills with tensors and registers with the server as a host
// region (RegisterHostRegion's shm_key is this object's key).
#ifndef ATTND_CLIENT_SHM_BUFFER_H_
#define ATTND_CLIENT_SHM_BUFFER_H_

#include <cstddef>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace attnd::client {

// Owns one POSIX shared-memory object and its mapping. The object is created exclusively (a
// name already in use is an error, not a silent share with a stranger) and unlinked when the
// buffer is destroyed, so a crashed run leaves at most one stale name behind. The server maps
// the object by name; unlinking it here does not pull memory from under a server that still
// has it mapped, but the client should unregister the region first all the same.
class SharedMemoryBuffer {
 public:
  // Creates `key` (a shm_open name: a leading '/', no other '/') of `size` bytes, zero-filled,
  // mapped read-write. ALREADY_EXISTS if the name is taken; INVALID_ARGUMENT for a bad name or
  // size 0.
  static absl::StatusOr<std::unique_ptr<SharedMemoryBuffer>> Create(std::string key, size_t size);

  // A key unlikely to collide with any other process's: "/<prefix>-<pid>-<random hex>".
  static std::string UniqueKey(absl::string_view prefix = "attnd");

  SharedMemoryBuffer(const SharedMemoryBuffer&) = delete;
  SharedMemoryBuffer& operator=(const SharedMemoryBuffer&) = delete;
  ~SharedMemoryBuffer();

  void* data() const { return data_; }
  size_t size() const { return size_; }
  const std::string& key() const { return key_; }

 private:
  SharedMemoryBuffer(std::string key, void* data, size_t size)
      : key_(std::move(key)), data_(data), size_(size) {}

  std::string key_;
  void* data_;
  size_t size_;
};

}  // namespace attnd::client

#endif  // ATTND_CLIENT_SHM_BUFFER_H_
