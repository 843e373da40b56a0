#include "client/shm_buffer.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <random>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace attnd::client {

absl::StatusOr<std::unique_ptr<SharedMemoryBuffer>> SharedMemoryBuffer::Create(std::string key,
                                                                               size_t size) {
  // POSIX leaves names without a leading slash, or with a second one, implementation-defined;
  // reject them so the server (which opens the same name) cannot read it differently.
  if (key.size() < 2 || key[0] != '/' || key.find('/', 1) != std::string::npos ||
      key.size() > 255) {
    return absl::InvalidArgumentError(absl::StrCat(
        "shm key must be '/' followed by 1..254 characters without '/', got \"", key, "\""));
  }
  if (size == 0) return absl::InvalidArgumentError("shm size must be > 0");

  const int fd = shm_open(key.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
  if (fd < 0) return absl::ErrnoToStatus(errno, absl::StrCat("shm_open(", key, ")"));
  if (ftruncate(fd, static_cast<off_t>(size)) != 0) {
    const int err = errno;
    close(fd);
    shm_unlink(key.c_str());
    return absl::ErrnoToStatus(err, absl::StrCat("ftruncate(", key, ", ", size, ")"));
  }
  void* data = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  const int err = errno;
  // The mapping keeps the object alive; the descriptor is no longer needed.
  close(fd);
  if (data == MAP_FAILED) {
    shm_unlink(key.c_str());
    return absl::ErrnoToStatus(err, absl::StrCat("mmap(", key, ", ", size, ")"));
  }
  return std::unique_ptr<SharedMemoryBuffer>(new SharedMemoryBuffer(std::move(key), data, size));
}

std::string SharedMemoryBuffer::UniqueKey(absl::string_view prefix) {
  std::random_device entropy;
  const uint64_t r = (static_cast<uint64_t>(entropy()) << 32) | entropy();
  return absl::StrFormat("/%s-%d-%016x", prefix, static_cast<int>(getpid()), r);
}

SharedMemoryBuffer::~SharedMemoryBuffer() {
  munmap(data_, size_);
  shm_unlink(key_.c_str());
}

}  // namespace attnd::client
