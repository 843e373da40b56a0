#include "client/client.h"

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <tuple>
#include <utility>

#include "absl/strings/str_cat.h"

namespace attnd::client {

absl::Status FromGrpcStatus(const grpc::Status& status) {
  if (status.ok()) return absl::OkStatus();
  // grpc::StatusCode and absl::StatusCode both number google.rpc.Code, so the cast is exact.
  return absl::Status(static_cast<absl::StatusCode>(status.error_code()), status.error_message());
}

absl::Status StreamResponseStatus(const v1::StreamResponse& response) {
  if (response.code() == 0) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(response.code()), response.message());
}

// ---- Client ----

namespace {

absl::StatusOr<std::string> ReadPem(absl::string_view option, const std::string& path) {
  std::FILE* f = std::fopen(path.c_str(), "rb");
  if (f == nullptr)
    return absl::InvalidArgumentError(
        absl::StrCat(option, "=", path, ": cannot be read: ", std::strerror(errno)));
  std::string contents;
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof(buf), f)) > 0) contents.append(buf, n);
  const bool failed = std::ferror(f) != 0;
  std::fclose(f);
  if (failed) return absl::InvalidArgumentError(absl::StrCat(option, "=", path, ": cannot be read"));
  return contents;
}

absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> ChannelCredentials(
    const ClientOptions& options) {
  if (options.tls_ca_file.empty() && options.tls_cert_file.empty())
    return grpc::InsecureChannelCredentials();
  if (options.tls_cert_file.empty() != options.tls_key_file.empty())
    return absl::InvalidArgumentError("tls_cert_file and tls_key_file go together");
  grpc::SslCredentialsOptions ssl;
  for (auto [option, path, pem] :
       {std::tuple{"tls_ca_file", &options.tls_ca_file, &ssl.pem_root_certs},
        std::tuple{"tls_cert_file", &options.tls_cert_file, &ssl.pem_cert_chain},
        std::tuple{"tls_key_file", &options.tls_key_file, &ssl.pem_private_key}}) {
    if (path->empty()) continue;
    absl::StatusOr<std::string> contents = ReadPem(option, *path);
    if (!contents.ok()) return contents.status();
    *pem = *std::move(contents);
  }
  return grpc::SslCredentials(ssl);
}

}  // namespace

absl::StatusOr<std::unique_ptr<Client>> Client::Connect(absl::string_view target,
                                                        const ClientOptions& options) {
  if (target.empty()) return absl::InvalidArgumentError("target is empty");
  absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> credentials =
      ChannelCredentials(options);
  if (!credentials.ok()) return credentials.status();
  grpc::ChannelArguments args;
  // Data calls are latency-bound one-per-layer calls; do not let the channel go idle and pay
  // a reconnect in the middle of a decode step.
  args.SetInt(GRPC_ARG_CLIENT_IDLE_TIMEOUT_MS, 1 << 30);
  if (options.own_connection) args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  if (!options.tls_server_name.empty()) args.SetSslTargetNameOverride(options.tls_server_name);
  std::shared_ptr<grpc::Channel> channel =
      grpc::CreateCustomChannel(std::string(target), *credentials, args);
  if (channel == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat("cannot create a channel to ", target));
  }
  if (options.connect_timeout > absl::ZeroDuration()) {
    const auto deadline = absl::ToChronoTime(absl::Now() + options.connect_timeout);
    if (!channel->WaitForConnected(deadline)) {
      return absl::UnavailableError(absl::StrCat("cannot connect to ", target, " within ",
                                                 absl::FormatDuration(options.connect_timeout)));
    }
  }
  return std::unique_ptr<Client>(new Client(std::string(target), options, std::move(channel)));
}

Client::Client(std::string target, const ClientOptions& options,
               std::shared_ptr<grpc::Channel> channel)
    : target_(std::move(target)),
      options_(options),
      channel_(std::move(channel)),
      stub_(v1::Attention::NewStub(channel_)),
      health_stub_(grpc::health::v1::Health::NewStub(channel_)) {}

// Every call's context, unary, health and Stream alike, is prepared here.
void Client::Prepare(grpc::ClientContext* context, const CallOptions& call) const {
  const absl::Duration timeout = call.timeout.value_or(options_.default_timeout);
  if (timeout != absl::InfiniteDuration()) {
    context->set_deadline(absl::ToChronoTime(absl::Now() + timeout));
  }
  if (!options_.token.empty()) context->AddMetadata("authorization", "Bearer " + options_.token);
  if (!options_.client_name.empty()) context->AddMetadata("attnd-client", options_.client_name);
}

template <typename Request, typename Response>
absl::StatusOr<Response> Client::Unary(
    grpc::Status (v1::Attention::Stub::*method)(grpc::ClientContext*, const Request&, Response*),
    const Request& request, const CallOptions& call) {
  grpc::ClientContext context;
  Prepare(&context, call);
  Response response;
  const grpc::Status status = ((*stub_).*method)(&context, request, &response);
  if (!status.ok()) return FromGrpcStatus(status);
  return response;
}

absl::StatusOr<v1::ServerInfo> Client::GetServerInfo(const CallOptions& call) {
  return Unary(&v1::Attention::Stub::GetServerInfo, v1::GetServerInfoRequest(), call);
}

absl::StatusOr<v1::Stats> Client::GetStats(const CallOptions& call) {
  return Unary(&v1::Attention::Stub::GetStats, v1::GetStatsRequest(), call);
}

absl::StatusOr<v1::LeaseInfo> Client::GetLease(const CallOptions& call) {
  return Unary(&v1::Attention::Stub::GetLease, v1::GetLeaseRequest(), call);
}

absl::StatusOr<v1::ReleaseAllResponse> Client::ReleaseAll(const CallOptions& call) {
  return Unary(&v1::Attention::Stub::ReleaseAll, v1::ReleaseAllRequest(), call);
}

absl::StatusOr<grpc::health::v1::HealthCheckResponse::ServingStatus> Client::Health(
    absl::string_view service, const CallOptions& call) {
  grpc::ClientContext context;
  Prepare(&context, call);
  grpc::health::v1::HealthCheckRequest request;
  request.set_service(std::string(service));
  grpc::health::v1::HealthCheckResponse response;
  const grpc::Status status = health_stub_->Check(&context, request, &response);
  if (!status.ok()) return FromGrpcStatus(status);
  return response.status();
}

absl::Status Client::RegisterHostRegion(absl::string_view name, absl::string_view shm_key,
                                        uint64_t offset, uint64_t byte_size,
                                        const CallOptions& call) {
  v1::RegisterHostRegionRequest request;
  request.set_name(std::string(name));
  request.set_shm_key(std::string(shm_key));
  request.set_offset(offset);
  request.set_byte_size(byte_size);
  return Unary(&v1::Attention::Stub::RegisterHostRegion, request, call).status();
}

absl::Status Client::RegisterCudaRegion(absl::string_view name, absl::string_view ipc_handle,
                                        uint32_t device, uint64_t byte_size,
                                        const CallOptions& call) {
  v1::RegisterCudaRegionRequest request;
  request.set_name(std::string(name));
  request.set_ipc_handle(std::string(ipc_handle));
  request.set_device(device);
  request.set_byte_size(byte_size);
  return Unary(&v1::Attention::Stub::RegisterCudaRegion, request, call).status();
}

absl::Status Client::UnregisterRegion(absl::string_view name, const CallOptions& call) {
  v1::UnregisterRegionRequest request;
  request.set_name(std::string(name));
  return Unary(&v1::Attention::Stub::UnregisterRegion, request, call).status();
}

absl::StatusOr<v1::ListRegionsResponse> Client::ListRegions(const CallOptions& call) {
  return Unary(&v1::Attention::Stub::ListRegions, v1::ListRegionsRequest(), call);
}

absl::Status Client::RegisterCudaEvent(absl::string_view name, absl::string_view ipc_handle,
                                       uint32_t device, const CallOptions& call) {
  v1::RegisterCudaEventRequest request;
  request.set_name(std::string(name));
  request.set_ipc_handle(std::string(ipc_handle));
  request.set_device(device);
  return Unary(&v1::Attention::Stub::RegisterCudaEvent, request, call).status();
}

absl::Status Client::UnregisterCudaEvent(absl::string_view name, const CallOptions& call) {
  v1::UnregisterCudaEventRequest request;
  request.set_name(std::string(name));
  return Unary(&v1::Attention::Stub::UnregisterCudaEvent, request, call).status();
}

absl::StatusOr<v1::SequenceInfo> Client::CreateSequence(uint32_t device, uint64_t seq_id,
                                                        const CallOptions& call) {
  v1::CreateSequenceRequest request;
  request.set_device(device);
  request.set_seq_id(seq_id);
  return Unary(&v1::Attention::Stub::CreateSequence, request, call);
}

absl::StatusOr<v1::SequenceInfo> Client::ForkSequence(uint32_t device, uint64_t parent_id,
                                                      uint64_t child_id, const CallOptions& call) {
  v1::ForkSequenceRequest request;
  request.set_device(device);
  request.set_parent_id(parent_id);
  request.set_child_id(child_id);
  return Unary(&v1::Attention::Stub::ForkSequence, request, call);
}

absl::StatusOr<v1::SequenceInfo> Client::TruncateSequence(uint32_t device, uint64_t seq_id,
                                                          uint64_t length,
                                                          const CallOptions& call) {
  v1::TruncateSequenceRequest request;
  request.set_device(device);
  request.set_seq_id(seq_id);
  request.set_length(length);
  return Unary(&v1::Attention::Stub::TruncateSequence, request, call);
}

absl::StatusOr<uint64_t> Client::ReleaseSequence(uint32_t device, uint64_t seq_id,
                                                 const CallOptions& call) {
  v1::ReleaseSequenceRequest request;
  request.set_device(device);
  request.set_seq_id(seq_id);
  absl::StatusOr<v1::ReleaseSequenceResponse> response =
      Unary(&v1::Attention::Stub::ReleaseSequence, request, call);
  if (!response.ok()) return response.status();
  return response->freed_pages();
}

absl::StatusOr<v1::SequenceInfo> Client::GetSequence(uint32_t device, uint64_t seq_id,
                                                     const CallOptions& call) {
  v1::GetSequenceRequest request;
  request.set_device(device);
  request.set_seq_id(seq_id);
  return Unary(&v1::Attention::Stub::GetSequence, request, call);
}

absl::StatusOr<v1::ListSequencesResponse> Client::ListSequences(uint32_t device,
                                                                const CallOptions& call) {
  v1::ListSequencesRequest request;
  request.set_device(device);
  return Unary(&v1::Attention::Stub::ListSequences, request, call);
}

absl::StatusOr<v1::AppendResponse> Client::Append(const v1::AppendRequest& request,
                                                  const CallOptions& call) {
  return Unary(&v1::Attention::Stub::Append, request, call);
}

absl::StatusOr<v1::AttentionResponse> Client::Prefill(const v1::AttentionRequest& request,
                                                      const CallOptions& call) {
  return Unary(&v1::Attention::Stub::Prefill, request, call);
}

absl::StatusOr<v1::AttentionResponse> Client::Decode(const v1::AttentionRequest& request,
                                                     const CallOptions& call) {
  return Unary(&v1::Attention::Stub::Decode, request, call);
}

absl::StatusOr<v1::ExportKvResponse> Client::ExportKv(const v1::ExportKvRequest& request,
                                                      const CallOptions& call) {
  return Unary(&v1::Attention::Stub::ExportKv, request, call);
}

absl::StatusOr<v1::ImportKvResponse> Client::ImportKv(const v1::ImportKvRequest& request,
                                                      const CallOptions& call) {
  return Unary(&v1::Attention::Stub::ImportKv, request, call);
}

absl::StatusOr<v1::KvGrant> Client::GrantKv(const v1::GrantKvRequest& request,
                                            const CallOptions& call) {
  return Unary(&v1::Attention::Stub::GrantKv, request, call);
}

absl::Status Client::RevokeKv(absl::string_view grant, const CallOptions& call) {
  v1::RevokeKvRequest request;
  request.set_grant(std::string(grant));
  return Unary(&v1::Attention::Stub::RevokeKv, request, call).status();
}

absl::StatusOr<v1::PullKvResponse> Client::PullKv(const v1::PullKvRequest& request,
                                                  const CallOptions& call) {
  return Unary(&v1::Attention::Stub::PullKv, request, call);
}

absl::Status Client::SetKvScales(uint32_t device, uint32_t layer_begin,
                                 absl::Span<const float> k_scales,
                                 absl::Span<const float> v_scales, const CallOptions& call) {
  v1::SetKvScalesRequest request;
  request.set_device(device);
  request.set_layer_begin(layer_begin);
  request.mutable_k_scales()->Add(k_scales.begin(), k_scales.end());
  request.mutable_v_scales()->Add(v_scales.begin(), v_scales.end());
  return Unary(&v1::Attention::Stub::SetKvScales, request, call).status();
}

absl::StatusOr<std::unique_ptr<DataStream>> Client::OpenStream(const CallOptions& call) {
  auto context = std::make_unique<grpc::ClientContext>();
  Prepare(context.get(), call);
  std::unique_ptr<grpc::ClientReaderWriter<v1::StreamRequest, v1::StreamResponse>> stream =
      stub_->Stream(context.get());
  if (stream == nullptr) return absl::InternalError("gRPC returned no stream");
  return std::unique_ptr<DataStream>(new DataStream(std::move(context), std::move(stream)));
}

// ---- DataStream ----

DataStream::~DataStream() {
  if (!finished_) {
    context_->TryCancel();
    (void)stream_->Finish();
  }
}

absl::Status DataStream::Break(absl::string_view what) {
  if (!finished_) {
    finished_ = true;
    absl::Status status = FromGrpcStatus(stream_->Finish());
    if (status.ok()) {
      // The server closed the stream cleanly while we still expected to talk to it.
      status = absl::UnavailableError(absl::StrCat("stream closed by the server during ", what));
    }
    broken_ = status;
  }
  pending_.clear();
  return broken_;
}

absl::StatusOr<uint64_t> DataStream::Send(v1::StreamRequest request) {
  if (!broken_.ok()) return broken_;
  if (writes_done_ || finished_) return absl::FailedPreconditionError("stream is closed");
  const uint64_t tag = next_tag_++;
  request.set_tag(tag);
  if (!stream_->Write(request)) return Break("Write");
  pending_.push_back(tag);
  return tag;
}

absl::StatusOr<uint64_t> DataStream::SendAppend(const v1::AppendRequest& request) {
  v1::StreamRequest message;
  *message.mutable_append() = request;
  return Send(std::move(message));
}

absl::StatusOr<uint64_t> DataStream::SendPrefill(const v1::AttentionRequest& request) {
  v1::StreamRequest message;
  *message.mutable_prefill() = request;
  return Send(std::move(message));
}

absl::StatusOr<uint64_t> DataStream::SendDecode(const v1::AttentionRequest& request) {
  v1::StreamRequest message;
  *message.mutable_decode() = request;
  return Send(std::move(message));
}

absl::StatusOr<v1::StreamResponse> DataStream::Receive() {
  if (!broken_.ok()) return broken_;
  if (pending_.empty()) return absl::FailedPreconditionError("no request is awaiting a response");
  v1::StreamResponse response;
  if (!stream_->Read(&response)) return Break("Read");
  const uint64_t expected = pending_.front();
  pending_.pop_front();
  if (response.tag() != expected) {
    // The contract answers in request order; a mismatch means the two sides no longer agree
    // which answer is whose, so nothing later on this stream can be trusted.
    broken_ = absl::InternalError(
        absl::StrCat("stream response has tag ", response.tag(), ", expected ", expected));
    context_->TryCancel();
    return broken_;
  }
  return response;
}

absl::StatusOr<v1::StreamResponse> DataStream::RoundTrip(v1::StreamRequest request) {
  if (!pending_.empty()) {
    return absl::FailedPreconditionError(
        absl::StrCat(pending_.size(), " pipelined responses must be received first"));
  }
  absl::StatusOr<uint64_t> tag = Send(std::move(request));
  if (!tag.ok()) return tag.status();
  return Receive();
}

absl::StatusOr<v1::AppendResponse> DataStream::Append(const v1::AppendRequest& request) {
  v1::StreamRequest message;
  *message.mutable_append() = request;
  absl::StatusOr<v1::StreamResponse> response = RoundTrip(std::move(message));
  if (!response.ok()) return response.status();
  if (absl::Status status = StreamResponseStatus(*response); !status.ok()) return status;
  if (!response->has_append()) return absl::InternalError("Append answered without a result");
  return std::move(*response->mutable_append());
}

absl::StatusOr<v1::AttentionResponse> DataStream::Prefill(const v1::AttentionRequest& request) {
  v1::StreamRequest message;
  *message.mutable_prefill() = request;
  absl::StatusOr<v1::StreamResponse> response = RoundTrip(std::move(message));
  if (!response.ok()) return response.status();
  if (absl::Status status = StreamResponseStatus(*response); !status.ok()) return status;
  if (!response->has_attention()) return absl::InternalError("Prefill answered without a result");
  return std::move(*response->mutable_attention());
}

absl::StatusOr<v1::AttentionResponse> DataStream::Decode(const v1::AttentionRequest& request) {
  v1::StreamRequest message;
  *message.mutable_decode() = request;
  absl::StatusOr<v1::StreamResponse> response = RoundTrip(std::move(message));
  if (!response.ok()) return response.status();
  if (absl::Status status = StreamResponseStatus(*response); !status.ok()) return status;
  if (!response->has_attention()) return absl::InternalError("Decode answered without a result");
  return std::move(*response->mutable_attention());
}

absl::Status DataStream::Close() {
  if (finished_) return broken_;
  while (broken_.ok() && !pending_.empty()) {
    absl::StatusOr<v1::StreamResponse> dropped = Receive();
    if (!dropped.ok()) break;
  }
  if (finished_) return broken_;
  if (!writes_done_) {
    writes_done_ = true;
    stream_->WritesDone();
  }
  finished_ = true;
  if (!broken_.ok()) {
    (void)stream_->Finish();
    return broken_;
  }
  return FromGrpcStatus(stream_->Finish());
}

}  // namespace attnd::client
