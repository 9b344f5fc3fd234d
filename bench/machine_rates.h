// The FMA-throughput loop the benchmarks measure a core's peak with (celo2-bench's machine
// rates, celo2-metatrain bench's efficiency): kFmaChains independent vector FMA chains,
// enough to cover the FMA latency times the FMA pipes of current x86 cores. The including
// file must be compiled with -ffp-contract=fast, so that a*x + y is one FMA.
#pragma once

#include <cstdint>

#include "celo2/isa.h"

namespace celo2::bench {

constexpr int kFmaChains = 12;
constexpr int kNativeVecBytes = CELO2_VEC_BYTES;  // what this file is compiled for

template <int Bytes> struct FmaVec;
template <> struct FmaVec<16> { typedef float type __attribute__((vector_size(16))); };
template <> struct FmaVec<32> { typedef float type __attribute__((vector_size(32))); };
template <> struct FmaVec<64> { typedef float type __attribute__((vector_size(64))); };

// iters × kFmaChains FMAs on vectors of Bytes bytes (2 FLOP per lane each); returns a sum
// of the chains so the work cannot be dropped (check it is finite).
template <int Bytes>
__attribute__((noinline)) float fma_chains(int64_t iters, float seed) {
  using V = typename FmaVec<Bytes>::type;
  constexpr int L = Bytes / 4;
  V acc[kFmaChains], x, y;
  for (int k = 0; k < kFmaChains; ++k)
    for (int j = 0; j < L; ++j) acc[k][j] = seed + 0.001f * static_cast<float>(k * L + j);
  for (int j = 0; j < L; ++j) x[j] = 0.99995f, y[j] = 2e-5f;
  for (int64_t it = 0; it < iters; ++it)
#pragma GCC unroll 12
    for (int k = 0; k < kFmaChains; ++k) acc[k] = acc[k] * x + y;  // one FMA
  float sum = 0.0f;
  for (int k = 0; k < kFmaChains; ++k)
    for (int j = 0; j < L; ++j) sum += acc[k][j];
  return sum;
}

// FLOP done by fma_chains<Bytes>(iters, ...).
template <int Bytes>
constexpr double fma_chains_flop(int64_t iters) {
  return 2.0 * kFmaChains * (Bytes / 4) * static_cast<double>(iters);
}

}  // namespace celo2::bench
