// A client-side workload for e2e tests: one shared-memory region laid out for q/k/v/out/lse,
// a copy of every sequence's K/V history, and checks of each output against the client's
// dense fp64 reference. For an fp8 pool the history holds what the pool holds: each value
// quantized with its layer's scale and dequantized, scale * fp8(x / scale); with per-token
// scales, each (token, kv head) row with its own, max |x| / 448 of the row (1 if all zero).
#ifndef ATTND_TESTING_HARNESS_H_
#define ATTND_TESTING_HARNESS_H_

#include <cstdint>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "client/client.h"
#include "client/shm_buffer.h"

namespace attnd::testing {

struct Item {
  uint64_t seq_id;
  uint32_t num_new_tokens;
};

enum class Path { kUnary, kStream };

class Harness {
 public:
  // Creates and registers a region named `region_name` big enough for `max_tokens` per call.
  static absl::StatusOr<std::unique_ptr<Harness>> Create(client::Client* client,
                                                         std::string region_name,
                                                         uint32_t device, uint64_t max_tokens,
                                                         uint64_t seed);
  // Unregisters the region (bounded to a second: the server may be gone), unless told to
  // LeaveRegionRegistered.
  ~Harness();
  // Destroying the harness will leave its region registered, as a client that vanishes does.
  // The client need not outlive the harness then.
  void LeaveRegionRegistered() { unregister_on_destroy_ = false; }

  const v1::ServerInfo& info() const { return info_; }
  const std::string& region() const { return region_; }
  client::SharedMemoryBuffer& buffer() { return *buffer_; }
  uint32_t device() const { return device_; }

  absl::Status CreateSequence(uint64_t seq_id);
  // SetKvScales of the harness's device, then the server's info again (the history's scales).
  absl::Status SetKvScales(uint32_t layer_begin, const std::vector<float>& k_scales,
                           const std::vector<float>& v_scales);
  // Fills fresh random inputs, poisons outputs and returns a valid request for `items`.
  v1::AttentionRequest BuildAttention(uint32_t layer, const std::vector<Item>& items,
                                      bool with_lse);
  v1::AppendRequest BuildAppend(uint32_t layer, const std::vector<Item>& items);

  // Sends a request built by BuildAttention; on success records the new K/V in the history and
  // checks out (and lse) against the reference. Returns the RPC's status; a wrong output is an
  // INTERNAL status naming the item and error.
  absl::Status RunAttention(const v1::AttentionRequest& request, bool decode,
                            Path path = Path::kUnary, client::DataStream* stream = nullptr);
  absl::Status RunAppend(const v1::AppendRequest& request);
  // Convenience: build + run.
  absl::Status Attend(uint32_t layer, const std::vector<Item>& items, bool decode,
                      bool with_lse = false, Path path = Path::kUnary,
                      client::DataStream* stream = nullptr);

  // Mirrors the server's Fork / Truncate in the client's history after the RPC succeeded.
  void ForkHistory(uint64_t parent, uint64_t child);
  void TruncateHistory(uint64_t seq_id, uint64_t length);
  uint64_t HistoryLength(uint64_t seq_id, uint32_t layer) const;
  // Records a write the test performed by other means (ImportKv): `k`/`v` are
  // [tokens][kv_heads][head_dim] floats.
  void SetHistory(uint64_t seq_id, uint32_t layer, std::vector<float> k, std::vector<float> v);
  const std::vector<float>& HistoryK(uint64_t seq_id, uint32_t layer) { return history_[seq_id].k[layer]; }
  const std::vector<float>& HistoryV(uint64_t seq_id, uint32_t layer) { return history_[seq_id].v[layer]; }

  // Where BuildAttention puts each tensor in the region (bytes from its start).
  uint64_t q_offset() const { return layout_.q; }
  uint64_t k_offset() const { return layout_.k; }
  uint64_t v_offset() const { return layout_.v; }
  uint64_t out_offset() const { return layout_.out; }
  uint64_t lse_offset() const { return layout_.lse; }
  const uint8_t* bytes() const { return static_cast<const uint8_t*>(buffer_->data()); }

  // Maximum relative error seen by the checks so far.
  double max_error() const { return max_error_; }
  double tolerance() const;

 private:
  struct History {
    std::vector<std::vector<float>> k, v;  // per layer, [tokens][kv_heads][head_dim]
  };
  struct Layout {
    uint64_t q, k, v, out, lse;
  };

  Harness(client::Client* client, v1::ServerInfo info, std::string region, uint32_t device,
          std::unique_ptr<client::SharedMemoryBuffer> buffer, uint64_t max_tokens, uint64_t seed);
  std::vector<float> RandomRows(uint64_t rows, uint64_t heads);
  void Write(uint64_t offset, const std::vector<float>& values);
  std::vector<float> Read(uint64_t offset, uint64_t count, v1::DType dtype) const;
  absl::Status Check(const v1::AttentionRequest& request, const std::vector<float>& q);
  // Appends rows [offset, offset + n) of the last built K/V to a sequence's history at `layer`,
  // as the pool holds them.
  void Record(uint64_t seq_id, uint32_t layer, uint64_t offset, uint64_t n);
  // What the pool holds for `value` at `layer` as K (kv 0) or V (kv 1); not for per-token
  // pools, whose rows Record quantizes whole.
  float Held(float value, uint32_t layer, int kv) const;

  client::Client* client_;
  v1::ServerInfo info_;
  std::string region_;
  uint32_t device_;
  std::unique_ptr<client::SharedMemoryBuffer> buffer_;
  Layout layout_;
  std::mt19937_64 rng_;
  std::map<uint64_t, History> history_;
  // Inputs of the last built request, as rounded floats.
  std::vector<float> last_q_, last_k_, last_v_;
  double max_error_ = 0;
  bool unregister_on_destroy_ = true;
};

}  // namespace attnd::testing

#endif  // ATTND_TESTING_HARNESS_H_
