// Helpers shared by the server unit tests: a real POSIX shared-memory object owned by the test,
// and the seed of a randomized test (fresh each run, printed, overridable for a replay).
#ifndef ATTND_TESTS_UNIT_UNIT_TEST_UTIL_H_
#define ATTND_TESTS_UNIT_UNIT_TEST_UTIL_H_

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <random>
#include <string>

#include <gtest/gtest.h>

namespace attnd::testing_util {

// A POSIX shared-memory object made for one test (O_CREAT | O_EXCL under a unique name), mapped
// into the test so it can write inputs and read outputs, and unlinked when the test ends.
class ShmObject {
 public:
  explicit ShmObject(size_t bytes) : bytes_(bytes) {
    static std::atomic<uint64_t> counter{0};
    const uint64_t salt = std::random_device{}();
    key_ = "/attnd-unit-" + std::to_string(getpid()) + "-" + std::to_string(counter++) + "-" +
           std::to_string(salt);
    const int fd = shm_open(key_.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
    if (fd < 0) {
      ADD_FAILURE() << "shm_open(" << key_ << "): " << std::strerror(errno);
      return;
    }
    if (ftruncate(fd, static_cast<off_t>(bytes)) != 0) {
      ADD_FAILURE() << "ftruncate(" << key_ << "): " << std::strerror(errno);
      close(fd);
      return;
    }
    void* map = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (map == MAP_FAILED) {
      ADD_FAILURE() << "mmap(" << key_ << "): " << std::strerror(errno);
      return;
    }
    data_ = static_cast<uint8_t*>(map);
  }
  ~ShmObject() {
    if (data_ != nullptr) munmap(data_, bytes_);
    shm_unlink(key_.c_str());
  }
  ShmObject(const ShmObject&) = delete;
  ShmObject& operator=(const ShmObject&) = delete;

  const std::string& key() const { return key_; }
  uint8_t* data() const { return data_; }
  size_t size() const { return bytes_; }

 private:
  size_t bytes_;
  std::string key_;
  uint8_t* data_ = nullptr;
};

// The seed of a randomized test: ATTND_TEST_SEED if set (to replay a failure), else fresh.
// Printed on stdout and attached to every failure of the calling scope through the returned
// trace text.
inline uint32_t TestSeed() {
  uint32_t seed;
  if (const char* env = std::getenv("ATTND_TEST_SEED"); env != nullptr && *env != '\0') {
    seed = static_cast<uint32_t>(std::strtoul(env, nullptr, 10));
  } else {
    seed = std::random_device{}();
  }
  std::cout << "[   SEED   ] " << seed << " (replay with ATTND_TEST_SEED=" << seed << ")\n";
  return seed;
}

}  // namespace attnd::testing_util

#endif  // ATTND_TESTS_UNIT_UNIT_TEST_UTIL_H_
