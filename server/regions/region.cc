#include "server/regions/region.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "absl/strings/str_cat.h"

namespace attnd {

absl::Status ValidateRegionName(const std::string& name) {
  if (name.empty() || name.size() > 128)
    return absl::InvalidArgumentError(
        absl::StrCat("name: must be 1..128 bytes, got ", name.size()));
  for (unsigned char c : name) {
    if (c < 0x21 || c > 0x7e)
      return absl::InvalidArgumentError("name: only printable ASCII without spaces");
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<HostRegion>> HostRegion::Open(
    std::string name, const std::string& shm_key, uint64_t offset, uint64_t byte_size,
    std::optional<uid_t> caller_uid) {
  if (shm_key.size() < 2 || shm_key.size() > 255 || shm_key[0] != '/' ||
      shm_key.find('/', 1) != std::string::npos)
    return absl::InvalidArgumentError(absl::StrCat(
        "shm_key: '", shm_key, "' must be '/' followed by 1..254 bytes without '/'"));
  if (byte_size == 0) return absl::InvalidArgumentError("byte_size: must be > 0");
  uint64_t end;
  if (__builtin_add_overflow(offset, byte_size, &end))
    return absl::InvalidArgumentError("offset + byte_size overflows 64 bits");

  // The key has no '/' past the first, so it names an entry of /dev/shm itself; that entry
  // could still be a symlink a client planted there, but glibc's shm_open opens with
  // O_NOFOLLOW and refuses it (region_test checks this).
  int fd = shm_open(shm_key.c_str(), O_RDWR, 0);
  if (fd < 0) {
    if (errno == ENOENT)
      return absl::NotFoundError(absl::StrCat("shm_key: no shared-memory object '", shm_key, "'"));
    return absl::FailedPreconditionError(
        absl::StrCat("shm_key: cannot open '", shm_key, "': ", std::strerror(errno)));
  }
  struct stat st;
  if (fstat(fd, &st) != 0) {
    int err = errno;
    close(fd);
    return absl::InternalError(absl::StrCat("fstat '", shm_key, "': ", std::strerror(err)));
  }
  // Checked on the open descriptor, not the name, so the object cannot be swapped in between.
  if (caller_uid.has_value() && *caller_uid != 0 && st.st_uid != *caller_uid) {
    close(fd);
    return absl::PermissionDeniedError(absl::StrCat(
        "shm_key: shared-memory object '", shm_key, "' is owned by uid ", st.st_uid,
        ", not by the caller's uid ", *caller_uid));
  }
  const uint64_t object_size = static_cast<uint64_t>(st.st_size);
  if (end > object_size) {
    close(fd);
    return absl::InvalidArgumentError(absl::StrCat(
        "byte_size: offset ", offset, " + byte_size ", byte_size, " exceeds the ", object_size,
        " bytes of shared-memory object '", shm_key, "'"));
  }
  // mmap wants a page-aligned file offset: map from the page holding `offset`.
  const uint64_t page = static_cast<uint64_t>(sysconf(_SC_PAGESIZE));
  const uint64_t map_offset = offset / page * page;
  const size_t map_len = static_cast<size_t>(end - map_offset);
  void* map = mmap(nullptr, map_len, PROT_READ | PROT_WRITE, MAP_SHARED, fd,
                   static_cast<off_t>(map_offset));
  const int map_errno = errno;
  close(fd);
  if (map == MAP_FAILED)
    return absl::ResourceExhaustedError(
        absl::StrCat("cannot map '", shm_key, "': ", std::strerror(map_errno)));
  // The object was big enough a moment ago, but its owner may shrink it at any time from now.
  auto guard = GuardedMapping::Register(map, map_len);
  if (!guard.ok()) {
    munmap(map, map_len);
    return guard.status();
  }
  auto* base = static_cast<uint8_t*>(map) + (offset - map_offset);
  std::unique_ptr<HostRegion> region(new HostRegion(std::move(name), base, byte_size, map,
                                                    map_len, *std::move(guard), shm_key, offset));
  region->set_backing(Backing{true, static_cast<uint64_t>(st.st_dev),
                              static_cast<uint64_t>(st.st_ino), offset});
  return region;
}

HostRegion::~HostRegion() {
  if (before_unmap_) before_unmap_();
  guard_.Unregister();  // before munmap: host_guard.h says why
  munmap(map_, map_len_);
}

std::string HostRegion::source() const { return absl::StrCat("shm:", shm_key_, "+", shm_offset_); }

absl::Status RegionRegistry::Add(std::shared_ptr<Region> region, uint32_t owner) {
  absl::MutexLock lock(&mu_);
  auto [it, inserted] = regions_.try_emplace(Key{owner, region->name()}, region);
  if (!inserted)
    return absl::AlreadyExistsError(
        absl::StrCat("name: a region named '", region->name(), "' is already registered"));
  return absl::OkStatus();
}

absl::Status RegionRegistry::Remove(const std::string& name, uint32_t owner) {
  // Unmapped here, outside the lock, if this was the last holder.
  if (Take(name, owner) == nullptr)
    return absl::NotFoundError(absl::StrCat("name: no region named '", name, "'"));
  return absl::OkStatus();
}

std::shared_ptr<Region> RegionRegistry::Take(const std::string& name, uint32_t owner) {
  absl::MutexLock lock(&mu_);
  auto it = regions_.find(Key{owner, name});
  if (it == regions_.end()) return nullptr;
  std::shared_ptr<Region> taken = std::move(it->second);
  regions_.erase(it);
  return taken;
}

std::shared_ptr<Region> RegionRegistry::Find(const std::string& name, uint32_t owner) const {
  absl::MutexLock lock(&mu_);
  auto it = regions_.find(Key{owner, name});
  return it == regions_.end() ? nullptr : it->second;
}

std::vector<RegionSummary> RegionRegistry::List(uint32_t owner) const {
  absl::MutexLock lock(&mu_);
  std::vector<RegionSummary> out;
  for (const auto& [key, r] : regions_) {
    if (key.first != owner) continue;
    RegionSummary s{key.second, r->kind(), r->device(), r->byte_size(), "", 0, r.use_count() - 1};
    if (auto* host = dynamic_cast<const HostRegion*>(r.get())) {
      s.shm_key = host->shm_key();
      s.shm_offset = host->shm_offset();
    }
    out.push_back(std::move(s));
  }
  return out;
}

std::vector<std::shared_ptr<Region>> RegionRegistry::RemoveOwner(uint32_t owner) {
  std::vector<std::shared_ptr<Region>> removed;
  absl::MutexLock lock(&mu_);
  for (auto it = regions_.begin(); it != regions_.end();) {
    if (it->first.first == owner) {
      removed.push_back(std::move(it->second));
      regions_.erase(it++);
    } else {
      ++it;
    }
  }
  return removed;
}

void RegionRegistry::Clear() {
  absl::flat_hash_map<Key, std::shared_ptr<Region>> doomed;
  {
    absl::MutexLock lock(&mu_);
    doomed.swap(regions_);
  }
}

size_t RegionRegistry::size() const {
  absl::MutexLock lock(&mu_);
  return regions_.size();
}

}  // namespace attnd
