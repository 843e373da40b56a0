// One thread per device that runs that device's work in arrival order. Everything that touches
// a device's pool or bookkeeping runs here, so none of it needs a lock, and (on CUDA) every call
// comes from a thread bound to the device that owns the memory.
#ifndef ATTND_SERVER_DEVICE_WORKER_H_
#define ATTND_SERVER_DEVICE_WORKER_H_

#include <deque>
#include <functional>
#include <thread>

#include "absl/functional/any_invocable.h"
#include "absl/synchronization/mutex.h"

namespace attnd {

class DeviceWorker {
 public:
  using Task = absl::AnyInvocable<void() &&>;

  // `bind` runs first on the new thread (on CUDA: cudaSetDevice).
  explicit DeviceWorker(std::function<void()> bind = nullptr);
  // Runs every task already posted, then joins.
  ~DeviceWorker();
  DeviceWorker(const DeviceWorker&) = delete;
  DeviceWorker& operator=(const DeviceWorker&) = delete;

  void Post(Task task);
  size_t queued() const;

 private:
  void Loop();
  bool HasWorkOrStopping() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return stopping_ || !tasks_.empty();
  }

  mutable absl::Mutex mu_;
  std::deque<Task> tasks_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::function<void()> bind_;
  std::thread thread_;
};

}  // namespace attnd

#endif  // ATTND_SERVER_DEVICE_WORKER_H_
