// Low-precision parameters (bfloat16, float16) and their float32 masters: the conversions
// (round to nearest even, as torch's .to() does; NaN stays NaN, overflow goes to ±Inf) and
// the two loops the engine runs on a rank's slice. Pure math, __host__ __device__ under
// nvcc, so the CPU tests cover the GPU's arithmetic (celo2/cuda/rule_cuda.h has the device
// loops).
//
// Masters: a bf16/fp16 parameter is updated through a float32 master copy of it. After each
// update the engine stores round(master) into the parameter. Before each step it compares the
// parameter with round(master): an element that differs was written by the trainer since
// (model.load_state_dict, an EMA swap, weight surgery), and its master is re-seeded from it
// (reseed_master). An element nobody touched keeps its master's extra precision.
#pragma once

#include <cstdint>
#include <cstring>
#include <string>

#include "celo2/elementwise.h"

namespace celo2 {

enum class DType : uint8_t { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };
const char* dtype_name(DType d);            // float32 | bfloat16 | float16
DType parse_dtype(const std::string& name);  // those names; throws std::invalid_argument
inline int dtype_bytes(DType d) { return d == DType::kFloat32 ? 4 : 2; }

namespace lowp {

CELO2_HD uint32_t bits_of(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}
CELO2_HD float float_of(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

CELO2_HD uint16_t to_bf16(float f) {
  uint32_t u = bits_of(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
CELO2_HD float from_bf16(uint16_t h) { return float_of(static_cast<uint32_t>(h) << 16); }

CELO2_HD uint16_t to_f16(float f) {
  const uint32_t u = bits_of(f);
  const uint32_t sign = (u >> 16) & 0x8000u, ax = u & 0x7fffffffu;
  if (ax >= 0x7f800000u) return static_cast<uint16_t>(sign | (ax > 0x7f800000u ? 0x7e00u : 0x7c00u));
  if (ax >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // >= 65520: Inf
  if (ax < 0x38800000u) {                                                // below 2^-14: subnormal
    if (ax < 0x33000000u) return static_cast<uint16_t>(sign);            // <= 2^-25: zero
    const uint32_t e = ax >> 23, m = (ax & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126u - e;  // 14..24: value / 2^-24 = m >> shift
    uint32_t r = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1u), half = 1u << (shift - 1u);
    r += (rem > half || (rem == half && (r & 1u))) ? 1u : 0u;
    return static_cast<uint16_t>(sign | r);
  }
  uint32_t r = ax - (112u << 23);  // rebias 127 -> 15
  r = (r + 0xfffu + ((r >> 13) & 1u)) >> 13;
  return static_cast<uint16_t>(sign | r);
}
CELO2_HD float from_f16(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  if (e == 0x1fu) return float_of(sign | 0x7f800000u | (m << 13));
  if (e == 0) {
    const float v = static_cast<float>(m) * 5.9604644775390625e-8f;  // m · 2^-24, exact
    return sign ? -v : v;
  }
  return float_of(sign | ((e + 112u) << 23) | (m << 13));
}

CELO2_HD uint16_t to_half(bool bf16, float f) { return bf16 ? to_bf16(f) : to_f16(f); }
CELO2_HD float from_half(bool bf16, uint16_t h) { return bf16 ? from_bf16(h) : from_f16(h); }

}  // namespace lowp

// The CPU loops over n elements (dtype bfloat16 or float16; `lowp` holds raw 16-bit values).
// dst[i] = round(src[i]).
void store_lowp(DType dtype, uint16_t* dst, const float* src, int64_t n);
// Where lowp[i] != round(master[i]) (bitwise): master[i] = lowp[i] as float. Returns how
// many were re-seeded.
int64_t reseed_master(DType dtype, float* master, const uint16_t* lowp, int64_t n);

}  // namespace celo2
