// Helpers for naming tensors in regions (TensorRef) and for moving element values between the
// client's float arrays and a region's bytes in the model dtype.
#ifndef ATTND_CLIENT_TENSOR_H_
#define ATTND_CLIENT_TENSOR_H_

#include <cstddef>
#include <cstdint>
#include <initializer_list>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "attnd/v1/attention.pb.h"
#include "attnd/v1/dtype.h"

namespace attnd::client {

// Bytes per element and readable names of the wire dtypes (proto/attnd/v1/dtype.h).
using v1::DTypeName;
using v1::DTypeSize;

// A TensorRef for a dense row-major array of `shape` elements of `dtype`, `offset` bytes into
// the region named `region`.
v1::TensorRef MakeTensorRef(absl::string_view region, uint64_t offset, v1::DType dtype,
                            absl::Span<const uint64_t> shape);
inline v1::TensorRef MakeTensorRef(absl::string_view region, uint64_t offset, v1::DType dtype,
                                   std::initializer_list<uint64_t> shape) {
  return MakeTensorRef(region, offset, dtype, absl::Span<const uint64_t>(shape));
}

// Elements and bytes a TensorRef covers. These do not check for overflow: they describe refs
// the client builds itself; the server does the overflow-safe check on whatever it is sent.
uint64_t NumElements(const v1::TensorRef& ref);
uint64_t ByteSize(const v1::TensorRef& ref);

// Writes src into dst as `dtype` elements (rounded to nearest even for 16-bit types).
void EncodeFloats(v1::DType dtype, absl::Span<const float> src, void* dst);
// Reads src.size() elements of `dtype` from src into dst.
void DecodeFloats(v1::DType dtype, const void* src, absl::Span<float> dst);
// The float a value becomes after a round trip through `dtype`: what the server will see.
float RoundToDType(v1::DType dtype, float value);

// Hands out aligned, non-overlapping byte ranges of a region front to back. A client lays its
// buffers out once at start-up, so there is no free.
class RegionAllocator {
 public:
  explicit RegionAllocator(uint64_t capacity) : capacity_(capacity) {}

  // Offset of `bytes` fresh bytes aligned to `alignment` (a power of two), or
  // RESOURCE_EXHAUSTED when the region has no room left.
  absl::StatusOr<uint64_t> Allocate(uint64_t bytes, uint64_t alignment = 256);

  uint64_t used() const { return used_; }
  uint64_t capacity() const { return capacity_; }

 private:
  uint64_t capacity_;
  uint64_t used_ = 0;
};

}  // namespace attnd::client

#endif  // ATTND_CLIENT_TENSOR_H_
