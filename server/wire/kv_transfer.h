// KV transfer between attnd processes, the wire side: each device's UCX transport (started on
// first use, its pool registered once), the source's answer to a peer's OpenKvPull, and the
// destination's pulls. A pull talks to the source attnd over gRPC (OpenKvPull, CloseKvPull)
// and reads the pages over UCX; it runs on this class's own threads, never on a gRPC callback
// thread or a device worker, so a slow or dead source holds up nothing but its own pull.
#ifndef ATTND_SERVER_WIRE_KV_TRANSFER_H_
#define ATTND_SERVER_WIRE_KV_TRANSFER_H_

#include <deque>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/functional/any_invocable.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "attnd/v1/attention.grpc.pb.h"
#include "server/engine/engine.h"
#include "server/engine/kv_runs.h"
#include "server/transport/ucx_transport.h"

namespace attnd::wire {

class KvTransfer {
 public:
  using PullDone = absl::AnyInvocable<void(absl::StatusOr<v1::PullKvResponse>) &&>;

  // Reads --kv_peer_token_file and --kv_peer_tls_ca_file now (INVALID_ARGUMENT naming the flag).
  static absl::StatusOr<std::unique_ptr<KvTransfer>> Create(Engine* engine);
  // Fails queued pulls, waits for running ones, then stops the transports.
  ~KvTransfer();

  // Whether `principal` is in --kv_peers.
  bool IsPeer(const std::string& principal) const;

  // The source: a peer opens a pull of a grant (the pages, the pool, its UCX address and key).
  absl::Status OpenPull(const v1::OpenKvPullRequest& req, v1::OpenKvPullResponse* resp);
  absl::Status ClosePull(const v1::CloseKvPullRequest& req);

  // The destination: queues a pull for `client`; `done` runs on a pull thread.
  void Pull(const ClientRef& client, const v1::PullKvRequest& req, PullDone done);

 private:
  // When each step of a pull ended, for its log line.
  struct PullTimes {
    absl::Time start, opened, reserved, read, committed;
  };
  struct QueuedPull {
    ClientRef client;
    v1::PullKvRequest req;
    PullDone done;
  };

  KvTransfer(Engine* engine, std::string token, std::string tls_ca);
  absl::StatusOr<UcxTransport*> TransportFor(uint32_t device);
  // The source's pool mapped into `device` through CUDA IPC when it is on this node and both
  // pools are GPU memory (--kv_same_node_ipc); null otherwise, or when mapping fails (UCX then).
  std::shared_ptr<Region> SameNodePool(const v1::PullKvRequest& req,
                                       const v1::OpenKvPullResponse& open, uint64_t bytes);
  // Copies the pages: one kernel from a mapped same-node pool, else a UCX read per run.
  absl::Status CopyPages(const v1::PullKvRequest& req, const v1::OpenKvPullResponse& open,
                         const kernels::KvCacheShape& src, const kernels::KvCacheShape& dst,
                         const KvPullShape& shape, absl::Span<const int32_t> src_pages,
                         absl::Span<const int32_t> dst_pages, absl::Time deadline,
                         v1::PullKvResponse* resp);
  std::shared_ptr<v1::Attention::Stub> StubFor(const std::string& target);
  // Prepares a call to a source: its deadline and this server's token.
  void PrepareContext(grpc::ClientContext* ctx, absl::Time deadline) const;
  void RunPullThread();
  absl::StatusOr<v1::PullKvResponse> RunPull(const ClientRef& client,
                                             const v1::PullKvRequest& req);
  // The steps of RunPull once the source has opened the pull.
  absl::StatusOr<v1::PullKvResponse> ReadPull(const ClientRef& client,
                                              const v1::PullKvRequest& req,
                                              const v1::OpenKvPullResponse& open,
                                              absl::Time deadline, PullTimes* times);

  // Constant after construction.
  Engine* const engine_;
  const std::string token_;   // presented to sources; may be empty
  const std::string tls_ca_;  // PEM; empty: plaintext TCP to sources

  mutable absl::Mutex mu_;
  // Started on first use, one per device id; never removed before destruction.
  absl::flat_hash_map<uint32_t, std::unique_ptr<UcxTransport>> transports_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<std::string, std::shared_ptr<v1::Attention::Stub>> stubs_
      ABSL_GUARDED_BY(mu_);
  // Source side: each device's pool IPC handle ("" when it has none).
  absl::flat_hash_map<uint32_t, std::string> pool_handles_ ABSL_GUARDED_BY(mu_);
  // Destination side: same-node peer pools mapped, by (device, source, handle); null where
  // mapping failed (not tried again).
  absl::flat_hash_map<std::string, std::shared_ptr<Region>> peer_pools_ ABSL_GUARDED_BY(mu_);
  std::deque<QueuedPull> queue_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<std::thread> threads_;
};

}  // namespace attnd::wire

#endif  // ATTND_SERVER_WIRE_KV_TRANSFER_H_
