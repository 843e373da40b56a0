// Runs callbacks once the GPU work enqueued before them on a stream has finished, without
// holding the stream up. Each callback records a pooled event; one thread per device waits on
// those events in order (blocking-sync events: it sleeps, it does not spin) and runs the
// callbacks. cudaLaunchHostFunc would do the same job inside the stream, where the next call's
// kernels wait until the driver's callback thread has woken and run it: tens of microseconds of
// idle GPU per call once calls are pipelined through IPC events.
#ifndef ATTND_SERVER_CUDA_COMPLETIONS_H_
#define ATTND_SERVER_CUDA_COMPLETIONS_H_

#include <cuda_runtime_api.h>

#include <deque>
#include <thread>
#include <utility>
#include <vector>

#include "absl/functional/any_invocable.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"

namespace attnd {

class CudaCompletions {
 public:
  using Callback = absl::AnyInvocable<void() &&>;

  explicit CudaCompletions(int device);
  // Waits for every callback still pending (their events), runs them, joins. Call with the
  // device current (events are destroyed here).
  ~CudaCompletions();
  CudaCompletions(const CudaCompletions&) = delete;
  CudaCompletions& operator=(const CudaCompletions&) = delete;

  // Runs `fn` on the completion thread once the work enqueued on `stream` so far is done; with
  // the device current. On an error fn runs at once and the error is returned.
  absl::Status Add(cudaStream_t stream, Callback fn);

 private:
  void Loop();

  const int device_;
  absl::Mutex mu_;
  std::deque<std::pair<cudaEvent_t, Callback>> pending_ ABSL_GUARDED_BY(mu_);
  std::vector<cudaEvent_t> free_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::thread thread_;  // last: starts once the members above are ready
};

}  // namespace attnd

#endif  // ATTND_SERVER_CUDA_COMPLETIONS_H_
