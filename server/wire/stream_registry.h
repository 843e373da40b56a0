// The Streams open in this process, so that a drain can end them: an open Stream is a call
// that never ends by itself, and gRPC's shutdown would wait for it until its deadline.
#ifndef ATTND_SERVER_WIRE_STREAM_REGISTRY_H_
#define ATTND_SERVER_WIRE_STREAM_REGISTRY_H_

#include <cstddef>

#include "absl/container/flat_hash_set.h"
#include "absl/synchronization/mutex.h"

namespace attnd::wire {

class StreamRegistry {
 public:
  // A registered stream (the Stream reactor). Closing is in two steps so that no stream is
  // finished, and so possibly deleted by gRPC, while the registry still looks at it.
  class Closable {
   public:
    // Called with the registry's lock held: stop serving new requests. True when nothing is
    // in flight and the caller must now call FinishClosed; otherwise the stream finishes by
    // itself once its in-flight requests are answered.
    virtual bool BeginClose() = 0;
    // Finishes the stream (UNAVAILABLE); called once, after a BeginClose that returned true.
    virtual void FinishClosed() = 0;

   protected:
    ~Closable() = default;
  };

  // The process's registry. One process serves one gRPC server, and the Stream reactors are
  // created by handlers that have no other way to reach main's drain.
  static StreamRegistry& Global();

  // False once CloseAll has run: the stream must end at once instead.
  bool Add(Closable* stream);
  // From the stream's end (before it is deleted); a stream not registered is ignored.
  void Remove(Closable* stream);
  // Closes every registered stream, and makes every later Add fail.
  void CloseAll();
  size_t size() const;

 private:
  mutable absl::Mutex mu_;
  absl::flat_hash_set<Closable*> streams_ ABSL_GUARDED_BY(mu_);
  bool closed_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace attnd::wire

#endif  // ATTND_SERVER_WIRE_STREAM_REGISTRY_H_
