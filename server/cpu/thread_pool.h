// A fixed set of threads for data-parallel loops of the CPU backend. ParallelFor blocks its
// caller until every index ran; the caller works too, so a pool of one thread plus the caller
// uses two cores.
#ifndef ATTND_SERVER_CPU_THREAD_POOL_H_
#define ATTND_SERVER_CPU_THREAD_POOL_H_

#include <cstdint>
#include <functional>
#include <thread>
#include <vector>

#include "absl/synchronization/mutex.h"

namespace attnd {

class ThreadPool {
 public:
  explicit ThreadPool(int num_threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  // Runs fn(i) for every i in [0, n), spread over the pool and the calling thread. One loop at
  // a time: callers from several threads take turns.
  void ParallelFor(int64_t n, const std::function<void(int64_t)>& fn);

 private:
  void Work();
  // Claims and runs indices of the current loop until none is left.
  void Drain() ABSL_LOCKS_EXCLUDED(mu_);

  absl::Mutex loop_mu_;  // serialises ParallelFor callers
  absl::Mutex mu_;
  const std::function<void(int64_t)>* fn_ ABSL_GUARDED_BY(mu_) = nullptr;
  int64_t next_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t end_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t running_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t generation_ ABSL_GUARDED_BY(mu_) = 0;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<std::thread> threads_;
};

}  // namespace attnd

#endif  // ATTND_SERVER_CPU_THREAD_POOL_H_
