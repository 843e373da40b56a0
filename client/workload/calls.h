// The workload's data calls: each one fills the region with fresh random inputs rounded to the
// model dtype, poisons the outputs, sends the call over the unary RPC or the stream, times it,
// advances the client's copies of the sequences by the server's answer and checks every output.
#ifndef ATTND_CLIENT_WORKLOAD_CALLS_H_
#define ATTND_CLIENT_WORKLOAD_CALLS_H_

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "attnd/v1/attention.pb.h"
#include "client/workload/buffers.h"
#include "client/workload/latencies.h"
#include "client/workload/sequence.h"
#include "client/workload/session.h"
#include "client/workload/verifier.h"

namespace attnd::workload {

enum class Transport { kUnary, kStream };

// `n` standard normal values, each rounded to the model dtype: exactly what the server reads.
std::vector<float> RandomRounded(Session& s, size_t n);

// A Prefill/Decode request for `items` at `layer` over `slot`'s tensors; lse only if asked.
v1::AttentionRequest BuildAttention(const Session& s, uint32_t layer, const Items& items,
                                    const Slot& slot, bool want_lse);

// Sends `request`, adds its time to `latencies` (if given) and counts the call and, when it is
// answered, its tokens.
absl::StatusOr<v1::AttentionResponse> CallAttention(Session& s, Op op, Transport transport,
                                                    const v1::AttentionRequest& request,
                                                    Latencies* latencies);

// Advances the copies of `layer` by an answer's `lengths` (k, v: the call's new rows).
absl::Status AdvanceCopies(Session& s, const std::string& label, uint32_t layer, const Items& items,
                           const google::protobuf::RepeatedField<uint64_t>& lengths, const float* k,
                           const float* v);

// Checks the out (and, with want_lse, lse) the server wrote into `slot` for `items`.
void VerifySlot(Session& s, const std::string& label, Op op, uint32_t layer, const Items& items,
                const float* q, const Slot& slot, bool want_lse);

// One Prefill or Decode with fresh random q/k/v, every output checked.
absl::Status FreshAttention(Session& s, Op op, Transport transport, uint32_t layer,
                            const Items& items, bool want_lse);

// One Append with fresh random k/v; with fresh == false it resends what the buffers hold and
// the copies track lengths only (the benchmark fills layers it does not check that way: no
// time spent on random numbers).
absl::Status FreshAppend(Session& s, uint32_t layer, const Items& items, bool fresh = true);

}  // namespace attnd::workload

#endif  // ATTND_CLIENT_WORKLOAD_CALLS_H_
