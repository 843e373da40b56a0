// The framing around the UCX blobs (worker addresses, packed rkeys) that attnd processes send
// each other. UCX's unpackers take a bare pointer and no length, so a truncated, corrupted or
// foreign blob handed to them reads past its end; a frame with a magic, a kind, a length and a
// checksum lets Read refuse such a blob, naming the field, before UCX sees it.
#ifndef ATTND_SERVER_TRANSPORT_UCX_BLOB_H_
#define ATTND_SERVER_TRANSPORT_UCX_BLOB_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace attnd {
namespace ucx_internal {

enum class BlobKind : uint8_t { kWorkerAddress = 'A', kRkey = 'K' };

// Wraps `bytes` bytes at `data` in a frame of kind `kind`.
std::string FrameBlob(BlobKind kind, const void* data, size_t bytes);

// A blob's payload, copied out of its frame into 8-byte-aligned memory (UCX reads packed
// addresses and keys through typed pointers).
class Blob {
 public:
  const void* data() const { return words_.get(); }
  void* mutable_data() { return words_.get(); }
  size_t size() const { return size_; }

 private:
  friend absl::StatusOr<Blob> UnframeBlob(BlobKind, absl::string_view, absl::string_view);
  std::unique_ptr<uint64_t[]> words_;
  size_t size_ = 0;
};

// The payload of `framed`; INVALID_ARGUMENT naming `field` when it is not a whole, intact frame
// of kind `kind`.
absl::StatusOr<Blob> UnframeBlob(BlobKind kind, absl::string_view framed, absl::string_view field);

}  // namespace ucx_internal
}  // namespace attnd

#endif  // ATTND_SERVER_TRANSPORT_UCX_BLOB_H_
