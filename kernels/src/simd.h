// Internal to kernels/src: GCC vector extensions at the width the including file is compiled
// for (AVX-512: 16 floats, AVX/AVX2: 8, otherwise 4), with unaligned load, store and splat.
// Used by the per-instruction-set rule loops (rule_fast.cc, compiled three times with
// different flags) and the batched Newton–Schulz (ns_batch.cc). Everything here has
// internal linkage, so copies compiled for different instruction sets never meet at link
// time (see rule_fast.h).
#pragma once

#include <cmath>
#include <cstring>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

// GCC 12 flags the max/min intrinsics' own undefined pass-through operand as uninitialized (a
// false positive inside the intrinsic header).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#include "celo2/isa.h"

namespace celo2::simd {
namespace {

constexpr int kV = CELO2_VEC_BYTES / static_cast<int>(sizeof(float));

typedef float VF __attribute__((vector_size(kV * sizeof(float))));

inline VF vload(const float* p) {
  VF v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void vstore(float* p, VF v) { std::memcpy(p, &v, sizeof v); }
// x in every lane: one broadcast (x − (+0) is x exactly, −0 and NaN included, and folds
// away). A lane-by-lane loop compiled to one masked broadcast per lane (GCC 12, AVX-512),
// which made the splats of the rule's per-block biases a hot spot of meta-training.
inline VF splat(float x) { return x - VF{}; }

// a > b ? a : b and a < b ? a : b lane-wise (x86's max/min: with a NaN, b). GCC compiles the
// vector ?: forms to a compare and a blend, two instructions where one does.
inline VF vmax(VF a, VF b) {
#if defined(__AVX512F__) && CELO2_VEC_BYTES == 64
  return reinterpret_cast<VF>(_mm512_max_ps(reinterpret_cast<__m512>(a), reinterpret_cast<__m512>(b)));
#elif defined(__AVX__) && CELO2_VEC_BYTES == 32
  return reinterpret_cast<VF>(_mm256_max_ps(reinterpret_cast<__m256>(a), reinterpret_cast<__m256>(b)));
#elif defined(__SSE2__) && CELO2_VEC_BYTES == 16
  return reinterpret_cast<VF>(_mm_max_ps(reinterpret_cast<__m128>(a), reinterpret_cast<__m128>(b)));
#else
  return a > b ? a : b;
#endif
}
inline VF vmin(VF a, VF b) {
#if defined(__AVX512F__) && CELO2_VEC_BYTES == 64
  return reinterpret_cast<VF>(_mm512_min_ps(reinterpret_cast<__m512>(a), reinterpret_cast<__m512>(b)));
#elif defined(__AVX__) && CELO2_VEC_BYTES == 32
  return reinterpret_cast<VF>(_mm256_min_ps(reinterpret_cast<__m256>(a), reinterpret_cast<__m256>(b)));
#elif defined(__SSE2__) && CELO2_VEC_BYTES == 16
  return reinterpret_cast<VF>(_mm_min_ps(reinterpret_cast<__m128>(a), reinterpret_cast<__m128>(b)));
#else
  return a < b ? a : b;
#endif
}

// Lane-wise square root, correctly rounded (as sqrtf).
inline VF vsqrt(VF x) {
#if defined(__AVX512F__) && CELO2_VEC_BYTES == 64
  return reinterpret_cast<VF>(_mm512_sqrt_ps(reinterpret_cast<__m512>(x)));
#elif defined(__AVX__) && CELO2_VEC_BYTES == 32
  return reinterpret_cast<VF>(_mm256_sqrt_ps(reinterpret_cast<__m256>(x)));
#elif defined(__SSE2__) && CELO2_VEC_BYTES == 16
  return reinterpret_cast<VF>(_mm_sqrt_ps(reinterpret_cast<__m128>(x)));
#else
  for (int i = 0; i < kV; ++i) x[i] = std::sqrt(x[i]);
  return x;
#endif
}

}  // namespace
}  // namespace celo2::simd
