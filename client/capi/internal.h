// What the C ABI's source files share: the objects behind the opaque handles, reporting a
// status into the caller's err buffer, and the guard that keeps C++ exceptions from crossing
// into C. Not installed: callers see attnd_c.h only.
#ifndef ATTND_CLIENT_CAPI_INTERNAL_H_
#define ATTND_CLIENT_CAPI_INTERNAL_H_

#include <cstddef>
#include <cstdint>
#include <memory>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "attnd/v1/attention.pb.h"
#include "client/client.h"

// The library is built with hidden visibility and a version script (attnd_c.map); the C
// functions are its only exports, so their declarations alone are made visible here.
#pragma GCC visibility push(default)
#include "client/capi/attnd_c.h"
#pragma GCC visibility pop

// Shared ownership: a stream's call runs on its client's channel, so a stream keeps the client
// alive and a caller (Python's garbage collector, in any order) may free the two either way.
struct attnd_client {
  std::shared_ptr<attnd::client::Client> client;
};

struct attnd_stream {
  std::shared_ptr<attnd::client::Client> client;  // declared first: destroyed after the stream
  std::unique_ptr<attnd::client::DataStream> stream;
  // Filled by every send. DataStream::Send takes its request by value, so the filled message
  // is moved into it and its parts are freed after the write; a Send that left the message
  // with the caller would let the parts be reused from one send to the next.
  attnd::v1::StreamRequest request;
};

namespace attnd::capi {

// Writes status's message into err (when err is not NULL and err_len > 0; "" for OK) and
// returns its code, the google.rpc.Code number C callers compare against.
int Report(const absl::Status& status, char* err, size_t err_len) noexcept;

// Called from a catch handler: reports what was thrown as 13 INTERNAL.
int ReportCurrentException(char* err, size_t err_len) noexcept;

// INVALID_ARGUMENT "<what> is NULL".
absl::Status NullError(absl::string_view what);

// Copies up to cap entries of src into dst (NULL: nothing is wanted).
inline void CopyOut(const google::protobuf::RepeatedField<uint64_t>& src, uint64_t* dst,
                    size_t cap) {
  if (dst == nullptr) return;
  const size_t n = cap < static_cast<size_t>(src.size()) ? cap : static_cast<size_t>(src.size());
  for (size_t i = 0; i < n; ++i) dst[i] = src.Get(static_cast<int>(i));
}

// Runs body (returning absl::Status) and reports its outcome. Every entry point goes through
// here so that no exception (bad_alloc, a library's throw) unwinds into a C or Python frame.
template <typename Body>
int Guard(char* err, size_t err_len, Body&& body) noexcept {
  try {
    return Report(body(), err, err_len);
  } catch (...) {
    return ReportCurrentException(err, err_len);
  }
}

}  // namespace attnd::capi

#endif  // ATTND_CLIENT_CAPI_INTERNAL_H_
