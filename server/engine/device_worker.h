// One thread per device that runs that device's work in arrival order. Everything that touches
// a device's pool or bookkeeping runs here, so none of it needs a lock, and (on CUDA) every call
// comes from a thread bound to the device that owns the memory.
#ifndef ATTND_SERVER_ENGINE_DEVICE_WORKER_H_
#define ATTND_SERVER_ENGINE_DEVICE_WORKER_H_

#include <atomic>
#include <chrono>
#include <deque>
#include <functional>
#include <thread>

#include "absl/functional/any_invocable.h"
#include "absl/synchronization/mutex.h"

namespace attnd {

class DeviceWorker {
 public:
  using Task = absl::AnyInvocable<void() &&>;

  // `bind` runs first on the new thread (on CUDA: cudaSetDevice). After each task the thread
  // polls its queue for up to `spin` before it goes to sleep: a request that arrives in that
  // window starts at once instead of paying a futex wake-up (tens of microseconds on an idle
  // core), which is what a client calling once per layer per step does. Zero: sleep at once.
  explicit DeviceWorker(std::function<void()> bind = nullptr,
                        std::chrono::microseconds spin = std::chrono::microseconds(0));
  // Runs every task already posted, then joins.
  ~DeviceWorker();
  DeviceWorker(const DeviceWorker&) = delete;
  DeviceWorker& operator=(const DeviceWorker&) = delete;

  void Post(Task task);
  size_t queued() const;

 private:
  void Loop();
  // Polls for work (or a stop) until `spin_` has passed; yields the core on every round so a
  // spinning worker never keeps a runnable thread (gRPC's, the client's) off it.
  void Spin() const;
  bool HasWorkOrStopping() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return stopping_ || !tasks_.empty();
  }

  mutable absl::Mutex mu_;
  std::deque<Task> tasks_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  // Mirrors HasWorkOrStopping() for Spin, which reads it without the lock.
  std::atomic<bool> wake_{false};
  std::function<void()> bind_;
  const std::chrono::microseconds spin_;
  std::thread thread_;  // last: starts once every member above is ready
};

}  // namespace attnd

#endif  // ATTND_SERVER_ENGINE_DEVICE_WORKER_H_
