#include "server/wire/stream_registry.h"

#include <vector>

namespace attnd::wire {

StreamRegistry& StreamRegistry::Global() {
  static StreamRegistry* const registry = new StreamRegistry();  // never destroyed
  return *registry;
}

bool StreamRegistry::Add(Closable* stream) {
  absl::MutexLock lock(&mu_);
  if (closed_) return false;
  streams_.insert(stream);
  return true;
}

void StreamRegistry::Remove(Closable* stream) {
  absl::MutexLock lock(&mu_);
  streams_.erase(stream);
}

void StreamRegistry::CloseAll() {
  std::vector<Closable*> idle;
  {
    absl::MutexLock lock(&mu_);
    closed_ = true;
    // A stream cannot end while the lock is held (its end calls Remove first), and one whose
    // BeginClose returned true ends only when FinishClosed is called below.
    for (Closable* stream : streams_) {
      if (stream->BeginClose()) idle.push_back(stream);
    }
  }
  // Off the lock: gRPC may run the stream's end, and so Remove, inside Finish.
  for (Closable* stream : idle) stream->FinishClosed();
}

size_t StreamRegistry::size() const {
  absl::MutexLock lock(&mu_);
  return streams_.size();
}

}  // namespace attnd::wire
