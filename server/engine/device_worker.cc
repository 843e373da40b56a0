#include "server/engine/device_worker.h"

namespace attnd {

DeviceWorker::DeviceWorker(std::function<void()> bind, std::chrono::microseconds spin)
    : bind_(std::move(bind)), spin_(spin), thread_([this] { Loop(); }) {}

DeviceWorker::~DeviceWorker() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
    wake_.store(true, std::memory_order_release);
  }
  thread_.join();
}

void DeviceWorker::Post(Task task) {
  absl::MutexLock lock(&mu_);
  tasks_.push_back(std::move(task));
  wake_.store(true, std::memory_order_release);
}

size_t DeviceWorker::queued() const {
  absl::MutexLock lock(&mu_);
  return tasks_.size();
}

void DeviceWorker::Spin() const {
  if (spin_.count() <= 0) return;
  const auto deadline = std::chrono::steady_clock::now() + spin_;
  while (!wake_.load(std::memory_order_acquire) && std::chrono::steady_clock::now() < deadline)
    std::this_thread::yield();
}

void DeviceWorker::Loop() {
  if (bind_) bind_();
  for (;;) {
    Spin();
    Task task;
    {
      absl::MutexLock lock(&mu_);
      mu_.Await(absl::Condition(this, &DeviceWorker::HasWorkOrStopping));
      if (tasks_.empty()) return;  // stopping, and nothing left to run
      task = std::move(tasks_.front());
      tasks_.pop_front();
      if (tasks_.empty() && !stopping_) wake_.store(false, std::memory_order_relaxed);
    }
    std::move(task)();
  }
}

}  // namespace attnd
