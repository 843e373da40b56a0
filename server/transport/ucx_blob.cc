#include "server/transport/ucx_blob.h"

#include <cstring>

#include "absl/status/status.h"
#include "absl/strings/str_format.h"

namespace attnd {
namespace ucx_internal {
namespace {

// Frame layout, little-endian as the host (peers are x86-64 attnd processes):
//   [0,4) magic "AXUC"  [4] kind  [5] format version  [6,8) zero  [8,12) payload bytes
//   [12,16) zero  [16,24) FNV-1a 64 of the payload  [24,...) payload
constexpr char kMagic[4] = {'A', 'X', 'U', 'C'};
constexpr uint8_t kVersion = 1;
constexpr size_t kHeaderBytes = 24;
// Worker addresses with every transport of a big node are a few KiB; keys are smaller.
constexpr size_t kMaxPayloadBytes = 1 << 20;

// Stable across processes and builds (absl::Hash is neither).
uint64_t Fnv1a64(const void* data, size_t bytes) {
  const auto* p = static_cast<const unsigned char*>(data);
  uint64_t h = 0xcbf29ce484222325ull;
  for (size_t i = 0; i < bytes; ++i) h = (h ^ p[i]) * 0x100000001b3ull;
  return h;
}

}  // namespace

std::string FrameBlob(BlobKind kind, const void* data, size_t bytes) {
  std::string out(kHeaderBytes + bytes, '\0');
  std::memcpy(out.data(), kMagic, sizeof(kMagic));
  out[4] = static_cast<char>(kind);
  out[5] = static_cast<char>(kVersion);
  const uint32_t length = static_cast<uint32_t>(bytes);
  std::memcpy(out.data() + 8, &length, sizeof(length));
  const uint64_t hash = Fnv1a64(data, bytes);
  std::memcpy(out.data() + 16, &hash, sizeof(hash));
  if (bytes > 0) std::memcpy(out.data() + kHeaderBytes, data, bytes);
  return out;
}

absl::StatusOr<Blob> UnframeBlob(BlobKind kind, absl::string_view framed,
                                 absl::string_view field) {
  const char* what = kind == BlobKind::kWorkerAddress ? "a UCX worker address"
                                                      : "a packed UCX remote key";
  if (framed.size() < kHeaderBytes || std::memcmp(framed.data(), kMagic, sizeof(kMagic)) != 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "%s (%d bytes) is not %s made by an attnd UcxTransport", field, framed.size(), what));
  }
  if (static_cast<uint8_t>(framed[4]) != static_cast<uint8_t>(kind)) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "%s holds a blob of kind '%c', expected %s ('%c')", field, framed[4], what,
        static_cast<char>(kind)));
  }
  if (static_cast<uint8_t>(framed[5]) != kVersion) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "%s has frame version %d, this attnd reads version %d", field,
        static_cast<uint8_t>(framed[5]), kVersion));
  }
  uint32_t length;
  uint64_t hash;
  std::memcpy(&length, framed.data() + 8, sizeof(length));
  std::memcpy(&hash, framed.data() + 16, sizeof(hash));
  if (length > kMaxPayloadBytes || framed.size() != kHeaderBytes + length) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "%s is %d bytes but its frame says %d payload bytes after a %d-byte header", field,
        framed.size(), length, kHeaderBytes));
  }
  const char* payload = framed.data() + kHeaderBytes;
  if (Fnv1a64(payload, length) != hash) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s is corrupted: its checksum does not match its %d bytes", field,
                        length));
  }
  Blob blob;
  blob.words_ = std::make_unique<uint64_t[]>((length + 7) / 8 + 1);
  blob.size_ = length;
  std::memcpy(blob.words_.get(), payload, length);
  return blob;
}

}  // namespace ucx_internal
}  // namespace attnd
