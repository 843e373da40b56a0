// The public dtype conversions of cpu_attention.h, one switch over the dtype around the traits of
// cpu_convert.h, and the per-token scales' access and quantization.
#include <cstdint>
#include <cstring>
#include <limits>

#include "kernels/cpu_attention.h"
#include "kernels/cpu_convert.h"

namespace attnd::kernels {

using cpu_convert::BF16;
using cpu_convert::F16;
using cpu_convert::F32;
using cpu_convert::Fp8;

float LoadAsFloat(const void* base, int64_t index, DType dtype) {
  switch (dtype) {
    case DType::kFloat32:
      return cpu_convert::LoadF32(base, index);
    case DType::kFloat16:
      return cpu_convert::HalfToFloat(static_cast<const uint16_t*>(base)[index]);
    case DType::kBFloat16:
      return cpu_convert::Bf16ToFloat(static_cast<const uint16_t*>(base)[index]);
    case DType::kFloat8E4M3:
      return cpu_convert::Fp8ToFloat(static_cast<const uint8_t*>(base)[index]);
  }
  return std::numeric_limits<float>::quiet_NaN();
}

void StoreFromFloat(void* base, int64_t index, DType dtype, float value) {
  switch (dtype) {
    case DType::kFloat32:
      cpu_convert::StoreF32(base, index, value);
      return;
    case DType::kFloat16:
      static_cast<uint16_t*>(base)[index] = cpu_convert::FloatToHalf(value);
      return;
    case DType::kBFloat16:
      static_cast<uint16_t*>(base)[index] = cpu_convert::FloatToBf16(value);
      return;
    case DType::kFloat8E4M3:
      static_cast<uint8_t*>(base)[index] = cpu_convert::FloatToFp8(value);
      return;
  }
}

void LoadRowAsFloat(const void* base, int64_t index, int64_t n, DType dtype, float* dst) {
  switch (dtype) {
    case DType::kFloat32:
      cpu_convert::LoadRow<F32>(static_cast<const float*>(base) + index, n, dst);
      return;
    case DType::kFloat16:
      cpu_convert::LoadRow<F16>(static_cast<const uint16_t*>(base) + index, n, dst);
      return;
    case DType::kBFloat16:
      cpu_convert::LoadRow<BF16>(static_cast<const uint16_t*>(base) + index, n, dst);
      return;
    case DType::kFloat8E4M3:
      cpu_convert::LoadRow<Fp8>(static_cast<const uint8_t*>(base) + index, n, dst);
      return;
  }
}

void StoreRowFromFloat(const float* src, int64_t n, DType dtype, void* base, int64_t index) {
  switch (dtype) {
    case DType::kFloat32:
      cpu_convert::StoreRow<F32>(src, n, static_cast<float*>(base) + index);
      return;
    case DType::kFloat16:
      cpu_convert::StoreRow<F16>(src, n, static_cast<uint16_t*>(base) + index);
      return;
    case DType::kBFloat16:
      cpu_convert::StoreRow<BF16>(src, n, static_cast<uint16_t*>(base) + index);
      return;
    case DType::kFloat8E4M3:
      cpu_convert::StoreRow<Fp8>(src, n, static_cast<uint8_t*>(base) + index);
      return;
  }
}

namespace {

// The scales are f32 at a 256-aligned offset of the pool; memcpy, as for fp32 elements, so that
// a pool of any declared type (a byte vector in tests) is read without aliasing another type.
uint8_t* ScaleAddress(void* pool, const KvCacheShape& shape, int64_t layer, int64_t page, int kv,
                      int64_t slot, int64_t head) {
  return static_cast<uint8_t*>(pool) + shape.ScalesByteOffset() +
         4 * shape.ScaleOffset(layer, page, kv, slot, head);
}

}  // namespace

float LoadTokenScale(const void* pool, const KvCacheShape& shape, int64_t layer, int64_t page,
                     int kv, int64_t slot, int64_t head) {
  float scale;
  std::memcpy(&scale, ScaleAddress(const_cast<void*>(pool), shape, layer, page, kv, slot, head),
              sizeof(scale));
  return scale;
}

void StoreTokenScale(void* pool, const KvCacheShape& shape, int64_t layer, int64_t page, int kv,
                     int64_t slot, int64_t head, float scale) {
  std::memcpy(ScaleAddress(pool, shape, layer, page, kv, slot, head), &scale, sizeof(scale));
}

float QuantizeTokenRow(const void* src, int64_t index, int64_t n, DType dtype, uint8_t* dst) {
  const auto quantize = [&](auto traits) {
    using T = decltype(traits);
    const auto* row = static_cast<const typename T::Storage*>(src) + index;
    const float scale = cpu_convert::RowScale<T>(row, n);
    cpu_convert::QuantizeRow<T>(row, n, scale, dst);
    return scale;
  };
  switch (dtype) {
    case DType::kFloat32:
      return quantize(F32{});
    case DType::kFloat16:
      return quantize(F16{});
    case DType::kBFloat16:
      return quantize(BF16{});
    case DType::kFloat8E4M3:  // never a model dtype
      break;
  }
  return std::numeric_limits<float>::quiet_NaN();
}

}  // namespace attnd::kernels
