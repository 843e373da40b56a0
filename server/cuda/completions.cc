#include "server/cuda/completions.h"

#include "absl/strings/str_cat.h"
#include "spdlog/spdlog.h"

namespace attnd {

CudaCompletions::CudaCompletions(int device) : device_(device), thread_([this] { Loop(); }) {}

CudaCompletions::~CudaCompletions() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
  }
  thread_.join();
  for (cudaEvent_t e : free_) cudaEventDestroy(e);
}

absl::Status CudaCompletions::Add(cudaStream_t stream, Callback fn) {
  cudaEvent_t event = nullptr;
  {
    absl::MutexLock lock(&mu_);
    if (!free_.empty()) {
      event = free_.back();
      free_.pop_back();
    }
  }
  cudaError_t e = cudaSuccess;
  if (event == nullptr)
    e = cudaEventCreateWithFlags(&event, cudaEventBlockingSync | cudaEventDisableTiming);
  if (e == cudaSuccess) e = cudaEventRecord(event, stream);
  if (e != cudaSuccess) {
    if (event != nullptr) cudaEventDestroy(event);
    std::move(fn)();
    return absl::InternalError(
        absl::StrCat("completion event: ", cudaGetErrorName(e), ": ", cudaGetErrorString(e)));
  }
  absl::MutexLock lock(&mu_);
  pending_.emplace_back(event, std::move(fn));
  return absl::OkStatus();
}

void CudaCompletions::Loop() {
  if (cudaSetDevice(device_) != cudaSuccess)
    spdlog::error("device={} completion thread: cannot select the device", device_);
  for (;;) {
    std::pair<cudaEvent_t, Callback> next;
    {
      absl::MutexLock lock(&mu_);
      mu_.Await(absl::Condition(
          +[](CudaCompletions* c) ABSL_EXCLUSIVE_LOCKS_REQUIRED(c->mu_) {
            return c->stopping_ || !c->pending_.empty();
          },
          this));
      if (pending_.empty()) return;  // stopping, nothing left
      next = std::move(pending_.front());
      pending_.pop_front();
    }
    // After a fault the wait fails at once; the callback only lets go of references, so it
    // runs either way.
    cudaEventSynchronize(next.first);
    std::move(next.second)();
    absl::MutexLock lock(&mu_);
    free_.push_back(next.first);
  }
}

}  // namespace attnd
