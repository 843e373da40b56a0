#include "client/tensor.h"

#include <cstring>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "client/half.h"

namespace attnd::client {

v1::TensorRef MakeTensorRef(absl::string_view region, uint64_t offset, v1::DType dtype,
                            absl::Span<const uint64_t> shape) {
  v1::TensorRef ref;
  ref.set_region(std::string(region));
  ref.set_offset(offset);
  ref.set_dtype(dtype);
  for (uint64_t dim : shape) ref.add_shape(dim);
  return ref;
}

uint64_t NumElements(const v1::TensorRef& ref) {
  uint64_t n = 1;
  for (uint64_t dim : ref.shape()) n *= dim;
  return n;
}

uint64_t ByteSize(const v1::TensorRef& ref) { return NumElements(ref) * DTypeSize(ref.dtype()); }

void EncodeFloats(v1::DType dtype, absl::Span<const float> src, void* dst) {
  switch (dtype) {
    case v1::DTYPE_FLOAT32:
      std::memcpy(dst, src.data(), src.size() * sizeof(float));
      return;
    case v1::DTYPE_FLOAT16: {
      auto* out = static_cast<uint16_t*>(dst);
      for (size_t i = 0; i < src.size(); ++i) out[i] = FloatToHalfBits(src[i]);
      return;
    }
    case v1::DTYPE_BFLOAT16: {
      auto* out = static_cast<uint16_t*>(dst);
      for (size_t i = 0; i < src.size(); ++i) out[i] = FloatToBFloat16Bits(src[i]);
      return;
    }
    default:
      return;
  }
}

void DecodeFloats(v1::DType dtype, const void* src, absl::Span<float> dst) {
  switch (dtype) {
    case v1::DTYPE_FLOAT32:
      std::memcpy(dst.data(), src, dst.size() * sizeof(float));
      return;
    case v1::DTYPE_FLOAT16: {
      const auto* in = static_cast<const uint16_t*>(src);
      for (size_t i = 0; i < dst.size(); ++i) dst[i] = HalfBitsToFloat(in[i]);
      return;
    }
    case v1::DTYPE_BFLOAT16: {
      const auto* in = static_cast<const uint16_t*>(src);
      for (size_t i = 0; i < dst.size(); ++i) dst[i] = BFloat16BitsToFloat(in[i]);
      return;
    }
    default:
      return;
  }
}

float RoundToDType(v1::DType dtype, float value) {
  switch (dtype) {
    case v1::DTYPE_FLOAT16:
      return HalfBitsToFloat(FloatToHalfBits(value));
    case v1::DTYPE_BFLOAT16:
      return BFloat16BitsToFloat(FloatToBFloat16Bits(value));
    default:
      return value;
  }
}

absl::StatusOr<uint64_t> RegionAllocator::Allocate(uint64_t bytes, uint64_t alignment) {
  if (alignment == 0 || (alignment & (alignment - 1)) != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("alignment must be a power of two, got ", alignment));
  }
  const uint64_t start = (used_ + alignment - 1) & ~(alignment - 1);
  if (start < used_ || start > capacity_ || bytes > capacity_ - start) {
    return absl::ResourceExhaustedError(absl::StrCat("region allocator: ", bytes,
                                                     " bytes do not fit; ", used_, " of ",
                                                     capacity_, " bytes used"));
  }
  used_ = start + bytes;
  return start;
}

}  // namespace attnd::client
