// The workload's shared memory: one POSIX shm object laid out as one slot of q/k/v/out/lse for
// the workload's own calls and, for the benchmark, a shared q/k/v plus one out/lse per call in
// flight. Values go in and out as floats, converted to and from the model dtype.
#ifndef ATTND_CLIENT_WORKLOAD_BUFFERS_H_
#define ATTND_CLIENT_WORKLOAD_BUFFERS_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "client/shm_buffer.h"
#include "client/workload/model.h"
#include "client/workload/options.h"

namespace attnd::workload {

// Byte offsets of one set of data-call buffers in the region, each with room for `tokens` rows.
struct Slot {
  uint64_t q = 0, k = 0, v = 0, out = 0, lse = 0;
  int64_t tokens = 0;
};

// How big the slots are.
struct BufferPlan {
  int64_t main_tokens = 0;  // rows of the main slot: the largest request of the workload
  int64_t bench_batch = 0;  // rows of each benchmark slot; 0: no benchmark slots
  int64_t pipeline = 0;     // benchmark slots: calls in flight in the pipelined mode
};

// The plan `options` needs on `model`.
BufferPlan PlanBuffers(const Model& model, const WorkloadOptions& options);

class Buffers {
 public:
  // Creates the shm object under a fresh key with `shm_prefix`, laid out by `plan`. With
  // `unlink_on_signal`, a fatal signal unlinks it before it takes the process down.
  static absl::StatusOr<std::unique_ptr<Buffers>> Create(const Model& model, const BufferPlan& plan,
                                                         absl::string_view shm_prefix,
                                                         bool unlink_on_signal);
  ~Buffers();

  const std::string& key() const { return shm_->key(); }
  uint64_t bytes() const { return shm_->size(); }
  const Slot& main() const { return main_; }
  const std::vector<Slot>& bench() const { return bench_; }

  // Writes `values` at `offset` as model-dtype elements.
  void Write(uint64_t offset, absl::Span<const float> values);
  // Fills the first `tokens` rows of the slot's out and lse with NaN.
  void Poison(const Slot& slot, int64_t tokens);
  // The first `tokens` rows of the slot's out ([tokens][qo_heads][head_dim]) and lse
  // ([tokens][qo_heads]) as floats.
  std::vector<float> ReadOut(const Slot& slot, int64_t tokens) const;
  std::vector<float> ReadLse(const Slot& slot, int64_t tokens) const;

 private:
  Buffers(const Model& model, Slot main, std::vector<Slot> bench,
          std::unique_ptr<client::SharedMemoryBuffer> shm);

  char* base() const { return static_cast<char*>(shm_->data()); }

  v1::DType dtype_;
  int64_t q_row_, qo_heads_;
  Slot main_;
  std::vector<Slot> bench_;
  std::unique_ptr<client::SharedMemoryBuffer> shm_;
};

}  // namespace attnd::workload

#endif  // ATTND_CLIENT_WORKLOAD_BUFFERS_H_
