// Status and exception reporting for the C ABI: codes as ints, messages copied into the
// caller's buffer.
#include <cstring>
#include <exception>

#include "absl/strings/str_cat.h"
#include "client/capi/internal.h"

namespace attnd::capi {
namespace {

// Appends `text` at err[*used], keeping room for the NUL; returns false once err is full.
// Never allocates, so reporting works even when the failure was an allocation.
bool Append(absl::string_view text, char* err, size_t err_len, size_t* used) {
  const size_t room = err_len - 1 - *used;
  size_t n = text.size() < room ? text.size() : room;
  if (n < text.size()) {
    // Cut before a UTF-8 continuation byte, so Python decodes the message without replacement
    // characters.
    while (n > 0 && (static_cast<unsigned char>(text[n]) & 0xC0) == 0x80) --n;
  }
  std::memcpy(err + *used, text.data(), n);
  *used += n;
  return n == text.size();
}

void Write(char* err, size_t err_len, absl::string_view first, absl::string_view second = {}) {
  if (err == nullptr || err_len == 0) return;
  size_t used = 0;
  if (Append(first, err, err_len, &used)) Append(second, err, err_len, &used);
  err[used] = '\0';
}

}  // namespace

int Report(const absl::Status& status, char* err, size_t err_len) noexcept {
  // OK writes "" too, so a buffer the caller reuses never shows an earlier call's message.
  Write(err, err_len, status.message());
  return static_cast<int>(status.code());
}

int ReportCurrentException(char* err, size_t err_len) noexcept {
  try {
    throw;
  } catch (const std::exception& e) {
    Write(err, err_len, "attnd C ABI: C++ exception: ", e.what());
  } catch (...) {
    Write(err, err_len, "attnd C ABI: unknown C++ exception");
  }
  return static_cast<int>(absl::StatusCode::kInternal);
}

absl::Status NullError(absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat(what, " is NULL"));
}

}  // namespace attnd::capi
