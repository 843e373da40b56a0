// The C++ client of attnd: one object per server connection, one method per RPC, and a
// DataStream for the bidirectional Stream. Every method returns absl::Status(Or); a gRPC error
// keeps its code and message, so callers can branch on e.g. absl::IsResourceExhausted.
//
// Thread safety: Client is safe to use from several threads at once (gRPC stubs are). A
// DataStream is not: one thread drives it at a time.
#ifndef ATTND_CLIENT_CLIENT_H_
#define ATTND_CLIENT_CLIENT_H_

#include <cstdint>
#include <deque>
#include <memory>
#include <optional>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "attnd/v1/attention.grpc.pb.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "grpcpp/grpcpp.h"

namespace attnd::client {

// grpc::Status -> absl::Status with the same code (both are google.rpc.Code) and message.
absl::Status FromGrpcStatus(const grpc::Status& status);

// The per-request outcome a StreamResponse carries, as an absl::Status.
absl::Status StreamResponseStatus(const v1::StreamResponse& response);

struct ClientOptions {
  // Deadline of every call that does not set its own; InfiniteDuration() means none.
  absl::Duration default_timeout = absl::InfiniteDuration();
  // How long Connect waits for the channel to be ready before giving up with UNAVAILABLE, so a
  // wrong target fails at once rather than on the first call. Zero: do not wait.
  absl::Duration connect_timeout = absl::Seconds(5);
  // A connection of this Client's own. Otherwise gRPC shares one connection among all Clients
  // of a process that name the same target, so dropping a Client closes nothing while another
  // is alive; tests that play many independent clients need their own.
  bool own_connection = false;

  // TLS (for attnd's TCP port when it has --tls_cert_file): on when tls_ca_file or
  // tls_cert_file is set. tls_ca_file: PEM CA certificates the server's certificate must chain
  // to (empty: gRPC's default roots). tls_cert_file + tls_key_file: this client's certificate
  // chain and key, for a server that requires them (--tls_client_ca_file). tls_server_name:
  // the name the server's certificate is checked against, when not the target's host.
  std::string tls_ca_file;
  std::string tls_cert_file;
  std::string tls_key_file;
  std::string tls_server_name;
  // Sent with every call, unary and Stream: `authorization: Bearer <token>` when set (the
  // server's --token_file names the client it stands for), and `attnd-client: <client_name>`
  // when set (one instance among several of the same client).
  std::string token;
  std::string client_name;
};

struct CallOptions {
  // This call's deadline, counted from its start; unset: the client's default_timeout.
  std::optional<absl::Duration> timeout;
};

class DataStream;

class Client {
 public:
  // target: "unix:///path/to.sock", or "host:port" for TCP; anything else gRPC accepts as a
  // target works too. Plaintext unless options ask for TLS; a TLS file that cannot be read is
  // INVALID_ARGUMENT naming the option.
  static absl::StatusOr<std::unique_ptr<Client>> Connect(absl::string_view target,
                                                         const ClientOptions& options = {});

  Client(const Client&) = delete;
  Client& operator=(const Client&) = delete;

  const std::string& target() const { return target_; }

  // ---- Server ----
  absl::StatusOr<v1::ServerInfo> GetServerInfo(const CallOptions& call = {});
  absl::StatusOr<v1::Stats> GetStats(const CallOptions& call = {});
  // grpc.health.v1 Check: "" is the whole server, "attnd.v1.Attention" the service,
  // "attnd.v1.Attention/device/<i>" one device.
  absl::StatusOr<grpc::health::v1::HealthCheckResponse::ServingStatus> Health(
      absl::string_view service, const CallOptions& call = {});

  // ---- This client's lease (what it holds against its quotas) ----
  absl::StatusOr<v1::LeaseInfo> GetLease(const CallOptions& call = {});
  // Releases every sequence, region and event this client holds.
  absl::StatusOr<v1::ReleaseAllResponse> ReleaseAll(const CallOptions& call = {});

  // ---- Regions ----
  absl::Status RegisterHostRegion(absl::string_view name, absl::string_view shm_key,
                                  uint64_t offset, uint64_t byte_size,
                                  const CallOptions& call = {});
  // ipc_handle: the 64 raw bytes of a cudaIpcMemHandle_t.
  absl::Status RegisterCudaRegion(absl::string_view name, absl::string_view ipc_handle,
                                  uint32_t device, uint64_t byte_size,
                                  const CallOptions& call = {});
  absl::Status UnregisterRegion(absl::string_view name, const CallOptions& call = {});
  absl::StatusOr<v1::ListRegionsResponse> ListRegions(const CallOptions& call = {});

  // ---- CUDA IPC events ----
  // ipc_handle: the 64 raw bytes of a cudaIpcEventHandle_t.
  absl::Status RegisterCudaEvent(absl::string_view name, absl::string_view ipc_handle,
                                 uint32_t device, const CallOptions& call = {});
  absl::Status UnregisterCudaEvent(absl::string_view name, const CallOptions& call = {});

  // ---- Sequences ----
  absl::StatusOr<v1::SequenceInfo> CreateSequence(uint32_t device, uint64_t seq_id,
                                                  const CallOptions& call = {});
  absl::StatusOr<v1::SequenceInfo> ForkSequence(uint32_t device, uint64_t parent_id,
                                                uint64_t child_id, const CallOptions& call = {});
  absl::StatusOr<v1::SequenceInfo> TruncateSequence(uint32_t device, uint64_t seq_id,
                                                    uint64_t length, const CallOptions& call = {});
  // Returns the number of pages freed.
  absl::StatusOr<uint64_t> ReleaseSequence(uint32_t device, uint64_t seq_id,
                                           const CallOptions& call = {});
  absl::StatusOr<v1::SequenceInfo> GetSequence(uint32_t device, uint64_t seq_id,
                                               const CallOptions& call = {});
  absl::StatusOr<v1::ListSequencesResponse> ListSequences(uint32_t device,
                                                          const CallOptions& call = {});

  // ---- Data ----
  absl::StatusOr<v1::AppendResponse> Append(const v1::AppendRequest& request,
                                            const CallOptions& call = {});
  absl::StatusOr<v1::AttentionResponse> Prefill(const v1::AttentionRequest& request,
                                                const CallOptions& call = {});
  absl::StatusOr<v1::AttentionResponse> Decode(const v1::AttentionRequest& request,
                                               const CallOptions& call = {});
  // ---- KV export / import ----
  absl::StatusOr<v1::ExportKvResponse> ExportKv(const v1::ExportKvRequest& request,
                                                const CallOptions& call = {});
  // KV transfer between attnd processes: grant on the source, pull on the destination.
  absl::StatusOr<v1::KvGrant> GrantKv(const v1::GrantKvRequest& request,
                                      const CallOptions& call = {});
  absl::Status RevokeKv(absl::string_view grant, const CallOptions& call = {});
  absl::StatusOr<v1::PullKvResponse> PullKv(const v1::PullKvRequest& request,
                                            const CallOptions& call = {});
  absl::StatusOr<v1::ImportKvResponse> ImportKv(const v1::ImportKvRequest& request,
                                                const CallOptions& call = {});

  // ---- fp8 KV scales ----
  // Sets the dequantization scales of layers [layer_begin, layer_begin + k_scales.size()) of
  // an fp8 pool (k_scales and v_scales of equal length). Refused with FAILED_PRECONDITION while
  // any sequence on the device holds KV at one of those layers: set scales before traffic.
  absl::Status SetKvScales(uint32_t device, uint32_t layer_begin,
                           absl::Span<const float> k_scales, absl::Span<const float> v_scales,
                           const CallOptions& call = {});

  // Opens a Stream. The deadline, if any, bounds the stream's whole life.
  absl::StatusOr<std::unique_ptr<DataStream>> OpenStream(const CallOptions& call = {});

 private:
  Client(std::string target, const ClientOptions& options, std::shared_ptr<grpc::Channel> channel);

  void Prepare(grpc::ClientContext* context, const CallOptions& call) const;

  template <typename Request, typename Response>
  absl::StatusOr<Response> Unary(grpc::Status (v1::Attention::Stub::*method)(grpc::ClientContext*,
                                                                             const Request&,
                                                                             Response*),
                                 const Request& request, const CallOptions& call);

  const std::string target_;
  const ClientOptions options_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::Attention::Stub> stub_;
  std::unique_ptr<grpc::health::v1::Health::Stub> health_stub_;
};

// One open Stream. Requests are answered exactly once each and in order, so the stream can be
// used two ways:
//  - synchronously: Append/Prefill/Decode send one request and wait for its answer;
//  - pipelined: Send several (each gets the next tag), then Receive their answers in order.
// A per-request error comes back as that request's status and leaves the stream open; a
// transport error (server gone, deadline) breaks the stream and every later call fails with it.
class DataStream {
 public:
  DataStream(const DataStream&) = delete;
  DataStream& operator=(const DataStream&) = delete;
  // Cancels the stream if Close was not called, so a dropped stream never blocks.
  ~DataStream();

  absl::StatusOr<v1::AppendResponse> Append(const v1::AppendRequest& request);
  absl::StatusOr<v1::AttentionResponse> Prefill(const v1::AttentionRequest& request);
  absl::StatusOr<v1::AttentionResponse> Decode(const v1::AttentionRequest& request);

  // Sends a request without waiting; its tag is overwritten with the next tag, returned.
  absl::StatusOr<uint64_t> Send(v1::StreamRequest request);
  absl::StatusOr<uint64_t> SendAppend(const v1::AppendRequest& request);
  absl::StatusOr<uint64_t> SendPrefill(const v1::AttentionRequest& request);
  absl::StatusOr<uint64_t> SendDecode(const v1::AttentionRequest& request);
  // The answer to the oldest request not yet received. The returned status is the transport's;
  // the request's own outcome is StreamResponseStatus(response).
  absl::StatusOr<v1::StreamResponse> Receive();

  // Requests sent but not yet received.
  size_t pending() const { return pending_.size(); }

  // Half-closes the stream and returns the server's final status. Responses still pending are
  // read and dropped first.
  absl::Status Close();

 private:
  friend class Client;
  DataStream(
      std::unique_ptr<grpc::ClientContext> context,
      std::unique_ptr<grpc::ClientReaderWriter<v1::StreamRequest, v1::StreamResponse>> stream)
      : context_(std::move(context)), stream_(std::move(stream)) {}

  // Sends one request and returns its response's status plus the response itself.
  absl::StatusOr<v1::StreamResponse> RoundTrip(v1::StreamRequest request);
  // Ends the RPC after a failed Read/Write and remembers why, for every later call.
  absl::Status Break(absl::string_view what);

  std::unique_ptr<grpc::ClientContext> context_;
  std::unique_ptr<grpc::ClientReaderWriter<v1::StreamRequest, v1::StreamResponse>> stream_;
  uint64_t next_tag_ = 1;
  std::deque<uint64_t> pending_;
  bool writes_done_ = false;
  bool finished_ = false;
  absl::Status broken_;  // OK while the stream is usable
};

}  // namespace attnd::client

#endif  // ATTND_CLIENT_CLIENT_H_
