#include "server/device_worker.h"

namespace attnd {

DeviceWorker::DeviceWorker(std::function<void()> bind)
    : bind_(std::move(bind)), thread_([this] { Loop(); }) {}

DeviceWorker::~DeviceWorker() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
  }
  thread_.join();
}

void DeviceWorker::Post(Task task) {
  absl::MutexLock lock(&mu_);
  tasks_.push_back(std::move(task));
}

size_t DeviceWorker::queued() const {
  absl::MutexLock lock(&mu_);
  return tasks_.size();
}

void DeviceWorker::Loop() {
  if (bind_) bind_();
  for (;;) {
    Task task;
    {
      absl::MutexLock lock(&mu_);
      mu_.Await(absl::Condition(this, &DeviceWorker::HasWorkOrStopping));
      if (tasks_.empty()) return;  // stopping, and nothing left to run
      task = std::move(tasks_.front());
      tasks_.pop_front();
    }
    std::move(task)();
  }
}

}  // namespace attnd
