// What capi_test needs besides the C ABI itself: a real attnd to talk to, ServerInfo read by
// field name, and a checked workload over one shared-memory region whose every call goes
// through attnd_c.h.
//
// Nothing here may carry attnd's generated protos: libattnd_c.so has its own (hidden) copy, and
// libprotobuf aborts when one process registers the same .proto twice. So attnd is started here
// rather than through testing::ServerProcess (which speaks the C++ client), only the proto-free
// parts of client/ are used (reference, half, shm_buffer), and ServerInfo is read through the
// descriptor set the build writes (ATTND_CAPI_DESCRIPTORS).
#ifndef ATTND_TESTS_E2E_CAPI_HARNESS_H_
#define ATTND_TESTS_E2E_CAPI_HARNESS_H_

#include <sys/types.h>

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "client/capi/attnd_c.h"
#include "client/reference.h"
#include "client/shm_buffer.h"
#include "gtest/gtest.h"

namespace attnd::testing {

constexpr size_t kErrLen = 512;
constexpr uint32_t kLayers = 2;     // the model CApiServer starts
constexpr size_t kSlots = 4;        // calls in flight at most: each has its own buffers
constexpr uint64_t kMaxRows = 512;  // new tokens per call at most

// A real attnd (the e2e model: 2 layers, 8 qo / 2 kv heads, head_dim 64, bf16, pages of 16) on
// a fresh Unix socket, no TCP, no /metrics; stopped with SIGTERM. ATTND_BINARY and
// ATTND_E2E_BACKEND in the environment choose the binary and the backend, as for the e2e suite.
class CApiServer {
 public:
  CApiServer();
  ~CApiServer();
  CApiServer(const CApiServer&) = delete;
  CApiServer& operator=(const CApiServer&) = delete;

  // Waits until attnd listens; false if it exited or took over 30 s.
  bool WaitListening();
  std::string Log() const;
  const std::string& target() const { return target_; }

 private:
  pid_t pid_ = -1;
  std::string log_, target_;
};

// The parts of attnd.v1.ServerInfo the tests use.
struct Info {
  uint32_t num_layers = 0, num_qo_heads = 0, num_kv_heads = 0, head_dim = 0, page_size = 0;
  int dtype = 0;
  client::AttentionParams params;
  bool serving = false;  // device 0
};

// Parses attnd_server_info's bytes as attnd.v1.ServerInfo; false if they do not parse.
bool ParseInfo(const std::vector<uint8_t>& bytes, Info* info);

// One call's buffers in the region, and what its outputs and lengths must be.
struct Slot {
  uint64_t q = 0, k = 0, v = 0, out = 0, lse = 0;  // byte offsets in the region
  std::vector<attnd_item> items;
  std::vector<double> ref_out, ref_lse;
  std::vector<uint64_t> lengths;
  bool with_lse = false;
};

// Calls with fresh random inputs and their fp64 reference outputs, kSlots of them at a time,
// plus the client's copy of every sequence's K/V history that the reference reads.
class CApiWorkload {
 public:
  CApiWorkload(const Info& info, uint64_t seed) : info_(info), rng_(seed) {}

  // Creates the shared memory and registers it as region "main"; the attnd status (or -1 for a
  // local failure), message in err (kErrLen bytes).
  int Register(attnd_client* client, char* err);

  // A call of `op` in slot `s`: fresh random inputs rounded to the model dtype, every output
  // element poisoned with NaN, and, if the call is to succeed, the history advanced as the
  // server will and the reference outputs it must write.
  attnd_call Build(int op, size_t s, uint32_t layer, std::vector<attnd_item> items,
                   bool with_lse = false, bool expect_ok = true);

  // Checks slot s's outputs (when its op wrote any) and the lengths the server returned.
  ::testing::AssertionResult Check(size_t s, bool wrote_outputs, const uint64_t* lengths,
                                   size_t num_lengths);

  // Mirror the server's Fork and Truncate in the history.
  void Fork(uint64_t parent, uint64_t child) { history_[child] = history_[parent]; }
  void Truncate(uint64_t seq_id, uint64_t length);

 private:
  uint8_t* bytes() { return static_cast<uint8_t*>(shm_->data()); }
  // n random normal values, rounded to the model dtype, stored at offset; returns them.
  std::vector<float> Random(uint64_t offset, uint64_t n);

  Info info_;
  std::mt19937_64 rng_;
  std::unique_ptr<client::SharedMemoryBuffer> shm_;
  Slot slots_[kSlots];
  // seq_id -> layer -> (K, V), [tokens][kv_heads][head_dim] each.
  std::map<uint64_t, std::map<uint32_t, std::pair<std::vector<float>, std::vector<float>>>>
      history_;
};

}  // namespace attnd::testing

#endif  // ATTND_TESTS_E2E_CAPI_HARNESS_H_
