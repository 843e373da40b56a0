#include "server/cpu/thread_pool.h"

namespace attnd {

ThreadPool::ThreadPool(int num_threads) {
  for (int i = 0; i < num_threads; ++i) threads_.emplace_back([this] { Work(); });
}

ThreadPool::~ThreadPool() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
  }
  for (std::thread& t : threads_) t.join();
}

void ThreadPool::Drain() {
  for (;;) {
    const std::function<void(int64_t)>* fn;
    int64_t i;
    {
      absl::MutexLock lock(&mu_);
      if (fn_ == nullptr || next_ >= end_) return;
      fn = fn_;
      i = next_++;
      ++running_;
    }
    (*fn)(i);
    absl::MutexLock lock(&mu_);
    --running_;
  }
}

void ThreadPool::Work() {
  uint64_t seen = 0;
  for (;;) {
    {
      absl::MutexLock lock(&mu_);
      auto ready = [this, &seen]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
        return stopping_ || (generation_ != seen && fn_ != nullptr && next_ < end_);
      };
      mu_.Await(absl::Condition(&ready));
      if (stopping_) return;
      seen = generation_;
    }
    Drain();
  }
}

void ThreadPool::ParallelFor(int64_t n, const std::function<void(int64_t)>& fn) {
  if (n <= 0) return;
  if (threads_.empty() || n == 1) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  absl::MutexLock loop_lock(&loop_mu_);
  {
    absl::MutexLock lock(&mu_);
    fn_ = &fn;
    next_ = 0;
    end_ = n;
    ++generation_;
  }
  Drain();
  absl::MutexLock lock(&mu_);
  auto done = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return next_ >= end_ && running_ == 0;
  };
  mu_.Await(absl::Condition(&done));
  fn_ = nullptr;
}

}  // namespace attnd
