// Scalar conversions between float and the two 16-bit float formats attnd serves, and the fp8
// e4m3 of fp8 KV pools, done with bit manipulation so the client needs neither a GPU toolkit nor
// kernels/. float -> narrower rounds to nearest, ties to even, as the hardware and the server's
// kernels do; a client that rounds any other way would see differences that are its own, not
// the server's.
#ifndef ATTND_CLIENT_HALF_H_
#define ATTND_CLIENT_HALF_H_

#include <cstdint>

namespace attnd::client {

// IEEE binary16. Overflow goes to +-inf, values below the smallest subnormal to +-0, NaN stays
// NaN (quiet).
uint16_t FloatToHalfBits(float value);
float HalfBitsToFloat(uint16_t bits);

// bfloat16: the top half of a binary32. Overflow goes to +-inf; NaN stays NaN (quiet).
uint16_t FloatToBFloat16Bits(float value);
float BFloat16BitsToFloat(uint16_t bits);

// fp8 e4m3 (OCP e4m3fn: 4 exponent bits biased by 7, 3 mantissa bits, no infinities), what an
// fp8 KV pool stores. Values beyond +-448, infinities included, saturate to +-448 (CUDA's
// __NV_SATFINITE); NaN becomes the NaN pattern S.1111.111.
uint8_t FloatToFp8E4M3Bits(float value);
float Fp8E4M3BitsToFloat(uint8_t bits);

}  // namespace attnd::client

#endif  // ATTND_CLIENT_HALF_H_
