// The public dtype conversions of cpu_attention.h, one switch over the dtype around the traits of
// cpu_convert.h.
#include <cstdint>
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

}  // namespace attnd::kernels
