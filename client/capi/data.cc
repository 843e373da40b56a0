// The data half of the C ABI: unary Append/Prefill/Decode and the pipelined Stream. The stream
// send is on the per-layer path of a model step, so it validates, refills the handle's request
// and writes, with nothing else in between.
#include <cstdint>
#include <memory>
#include <utility>

#include "absl/strings/str_cat.h"
#include "client/capi/call.h"
#include "client/capi/internal.h"

using attnd::capi::CopyOut;
using attnd::capi::Guard;
using attnd::capi::NullError;

namespace {

// Sends one validated call as its unary RPC; the answer's lengths go to lengths[0..cap).
absl::Status Unary(attnd::client::Client& client, const attnd_call& call, uint64_t* lengths,
                   size_t cap) {
  if (call.op == ATTND_OP_APPEND) {
    attnd::v1::AppendRequest request;
    attnd::capi::FillAppend(call, &request);
    auto response = client.Append(request);
    if (!response.ok()) return response.status();
    CopyOut(response->lengths(), lengths, cap);
    return absl::OkStatus();
  }
  attnd::v1::AttentionRequest request;
  attnd::capi::FillAttention(call, &request);
  auto response =
      call.op == ATTND_OP_PREFILL ? client.Prefill(request) : client.Decode(request);
  if (!response.ok()) return response.status();
  CopyOut(response->lengths(), lengths, cap);
  return absl::OkStatus();
}

// The lengths an OK stream answer carries, whichever op it answers.
absl::StatusOr<const google::protobuf::RepeatedField<uint64_t>*> AnswerLengths(
    const attnd::v1::StreamResponse& response) {
  switch (response.result_case()) {
    case attnd::v1::StreamResponse::kAppend:
      return &response.append().lengths();
    case attnd::v1::StreamResponse::kAttention:
      return &response.attention().lengths();
    default:
      return absl::InternalError(
          absl::StrCat("stream answer ", response.tag(), " is OK but carries no result"));
  }
}

}  // namespace

extern "C" {

int attnd_call_unary(attnd_client* client, const attnd_call* call, uint64_t* lengths, size_t cap,
                     char* err, size_t err_len) {
  return Guard(err, err_len, [&]() -> absl::Status {
    if (client == nullptr) return NullError("client");
    if (absl::Status s = attnd::capi::ValidateCall(call); !s.ok()) return s;
    return Unary(*client->client, *call, lengths, cap);
  });
}

int attnd_stream_open(attnd_client* client, attnd_stream** out, char* err, size_t err_len) {
  if (out != nullptr) *out = nullptr;
  return Guard(err, err_len, [&]() -> absl::Status {
    if (client == nullptr) return NullError("client");
    if (out == nullptr) return NullError("out");
    auto stream = client->client->OpenStream();
    if (!stream.ok()) return stream.status();
    auto handle = std::make_unique<attnd_stream>();
    handle->client = client->client;
    handle->stream = *std::move(stream);
    *out = handle.release();
    return absl::OkStatus();
  });
}

int attnd_stream_send(attnd_stream* stream, const attnd_call* call, uint64_t* tag, char* err,
                      size_t err_len) {
  return Guard(err, err_len, [&]() -> absl::Status {
    if (stream == nullptr) return NullError("stream");
    // A call refused here sends nothing and takes no tag: the stream stays as it was.
    if (absl::Status s = attnd::capi::ValidateCall(call); !s.ok()) return s;
    attnd::capi::FillStreamRequest(*call, &stream->request);
    // DataStream::Send takes the request by value: moving hands the filled message over
    // without a copy, leaving the handle's request empty for the next send to fill.
    absl::StatusOr<uint64_t> sent = stream->stream->Send(std::move(stream->request));
    if (!sent.ok()) return sent.status();
    if (tag != nullptr) *tag = *sent;
    return absl::OkStatus();
  });
}

int attnd_stream_receive(attnd_stream* stream, uint64_t* tag, uint64_t* lengths, size_t cap,
                         size_t* num_lengths, char* err, size_t err_len) {
  // Reset first, so that no failure leaves an earlier answer's values for the caller to trust.
  if (tag != nullptr) *tag = 0;
  if (num_lengths != nullptr) *num_lengths = 0;
  return Guard(err, err_len, [&]() -> absl::Status {
    if (stream == nullptr) return NullError("stream");
    absl::StatusOr<attnd::v1::StreamResponse> response = stream->stream->Receive();
    if (!response.ok()) return response.status();  // the transport's: the stream is broken
    if (tag != nullptr) *tag = response->tag();
    if (absl::Status s = attnd::client::StreamResponseStatus(*response); !s.ok()) return s;
    auto answered = AnswerLengths(*response);
    if (!answered.ok()) return answered.status();
    CopyOut(**answered, lengths, cap);
    if (num_lengths != nullptr) *num_lengths = static_cast<size_t>((*answered)->size());
    return absl::OkStatus();
  });
}

size_t attnd_stream_pending(const attnd_stream* stream) {
  return stream == nullptr ? 0 : stream->stream->pending();
}

int attnd_stream_close(attnd_stream* stream, char* err, size_t err_len) {
  // Owned from here: the handle is freed whatever Close says.
  std::unique_ptr<attnd_stream> owned(stream);
  return Guard(err, err_len, [&]() -> absl::Status {
    if (owned == nullptr) return absl::OkStatus();
    return owned->stream->Close();
  });
}

}  // extern "C"
