// Regions: client memory the server maps once and later reads and writes through TensorRefs.
// A Region is owned by shared_ptr: the registry holds one reference, each in-flight request
// another, so unregistering removes the name at once and unmaps after the last request ends.
#ifndef ATTND_SERVER_REGIONS_REGION_H_
#define ATTND_SERVER_REGIONS_REGION_H_

#include <sys/types.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "server/regions/host_guard.h"

namespace attnd {

class Region {
 public:
  enum class Kind { kHost, kCuda };

  virtual ~Region() = default;
  Region(const Region&) = delete;
  Region& operator=(const Region&) = delete;

  const std::string& name() const { return name_; }
  Kind kind() const { return kind_; }
  int device() const { return device_; }  // -1 for host memory
  uint8_t* base() const { return base_; }
  uint64_t byte_size() const { return byte_size_; }
  // Where the memory came from, for ListRegions ("shm:/key+offset", "cuda-ipc").
  virtual std::string source() const = 0;

  // The object a host region maps, and where the region starts in it: two regions on one
  // object share memory though their mappings differ (a client may register it twice).
  struct Backing {
    bool known = false;
    uint64_t device = 0, inode = 0;
    uint64_t offset = 0;
  };
  const Backing& backing() const { return backing_; }

 protected:
  Region(std::string name, Kind kind, int device, uint8_t* base, uint64_t byte_size)
      : name_(std::move(name)), kind_(kind), device_(device), base_(base), byte_size_(byte_size) {}
  void set_backing(const Backing& backing) { backing_ = backing; }

 private:
  std::string name_;
  Kind kind_;
  int device_;
  uint8_t* base_;
  uint64_t byte_size_;
  Backing backing_;
};

// A range of a POSIX shared-memory object, mapped read-write and guarded against the object
// shrinking under attnd (host_guard.h): an access past the object's new end does not kill the
// process, it turns the whole mapping into zeros and sets damaged().
class HostRegion final : public Region {
 public:
  // Maps [offset, offset + byte_size) of the object `shm_key`. With `caller_uid` set and not 0,
  // the object must belong to that uid (PERMISSION_DENIED otherwise): attnd often runs as root
  // and could open objects its caller cannot, so it opens only what the caller owns. Root
  // callers and callers of unknown uid (nullopt) are not checked.
  static absl::StatusOr<std::unique_ptr<HostRegion>> Open(
      std::string name, const std::string& shm_key, uint64_t offset, uint64_t byte_size,
      std::optional<uid_t> caller_uid = std::nullopt);
  ~HostRegion() override;
  std::string source() const override;
  const std::string& shm_key() const { return shm_key_; }
  uint64_t shm_offset() const { return shm_offset_; }
  // The whole page-aligned mapping that holds the region.
  void* mapping() const { return map_; }
  size_t mapping_bytes() const { return map_len_; }
  // Runs just before the memory is unmapped (the CUDA backend unpins it there).
  void SetBeforeUnmap(std::function<void()> hook) { before_unmap_ = std::move(hook); }
  // The object shrank under attnd: an access hit its cut part, and everything read from the
  // region since then was zeros (writes went to memory the client never sees). Sticky: the
  // client has to register the region again. Check it after the work that read the region.
  bool damaged() const { return guard_.damaged(); }

 private:
  HostRegion(std::string name, uint8_t* base, uint64_t byte_size, void* map, size_t map_len,
             GuardedMapping guard, std::string shm_key, uint64_t shm_offset)
      : Region(std::move(name), Kind::kHost, -1, base, byte_size),
        map_(map), map_len_(map_len), guard_(std::move(guard)), shm_key_(std::move(shm_key)),
        shm_offset_(shm_offset) {}

  void* map_;
  size_t map_len_;
  GuardedMapping guard_;  // unregistered before map_ is unmapped (host_guard.h says why)
  std::string shm_key_;
  uint64_t shm_offset_;
  std::function<void()> before_unmap_;
};

struct RegionSummary {
  std::string name;
  Region::Kind kind;
  int device;
  uint64_t byte_size;
  std::string shm_key;
  uint64_t shm_offset = 0;
  int64_t in_flight;  // requests holding the region now
};

// Names are per client: `owner` (0 for in-process callers) sees and touches only its own.
class RegionRegistry {
 public:
  // ALREADY_EXISTS if the owner already has a region of that name.
  absl::Status Add(std::shared_ptr<Region> region, uint32_t owner = 0);
  // NOT_FOUND if the owner has no such name. The region stays mapped while requests hold it.
  absl::Status Remove(const std::string& name, uint32_t owner = 0);
  // Removes and returns the owner's region of that name; nullptr if there is none.
  std::shared_ptr<Region> Take(const std::string& name, uint32_t owner = 0);
  // nullptr if the owner has no such name.
  std::shared_ptr<Region> Find(const std::string& name, uint32_t owner = 0) const;
  std::vector<RegionSummary> List(uint32_t owner = 0) const;
  // Removes every region of `owner`; returns them (each unmapped when its last holder lets go).
  std::vector<std::shared_ptr<Region>> RemoveOwner(uint32_t owner);
  size_t size() const;
  // Drops every region (at shutdown, after all work is done).
  void Clear();

 private:
  using Key = std::pair<uint32_t, std::string>;  // (owner, name)
  mutable absl::Mutex mu_;
  absl::flat_hash_map<Key, std::shared_ptr<Region>> regions_ ABSL_GUARDED_BY(mu_);
};

// Checks a region name from the wire: 1..128 printable bytes.
absl::Status ValidateRegionName(const std::string& name);

}  // namespace attnd

#endif  // ATTND_SERVER_REGIONS_REGION_H_
