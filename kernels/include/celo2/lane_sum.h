// Sums in double over a float array's elements, in a fixed partition that the compiler can
// vectorize and OpenMP can thread without changing the result: chunks of kSumChunk elements
// (threads take whole chunks), kSumLanes lanes inside a chunk (lane j adds elements
// j, j + 16, ...), then the lanes in order, the chunk's tail, and the chunks in order. The same
// bits at any thread count. A single running double (one add per element) is latency-bound:
// the recipe's apply and gradient statistics ran at 1–2.5 ns per element that way, against
// 0.3 here (docs/PERF.md, "The element-wise passes of the step").
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace celo2 {

inline constexpr int kSumLanes = 16;
inline constexpr int64_t kSumChunk = int64_t{1} << 16;

// Σ f(i) over [i0, i1) in the lanes above; f may also write element i (it is called once per i).
template <class F>
inline double lane_sum_range(int64_t i0, int64_t i1, F& f) {
  double acc[kSumLanes] = {};
  int64_t i = i0;
  for (; i + kSumLanes <= i1; i += kSumLanes) {
#pragma omp simd
    for (int j = 0; j < kSumLanes; ++j) acc[j] += f(i + j);
  }
  double s = 0.0;
  for (int j = 0; j < kSumLanes; ++j) s += acc[j];
  for (; i < i1; ++i) s += f(i);
  return s;
}

// Σ f(i) over [0, n): chunks on the OpenMP threads when there are several (no parallel region
// for one chunk: entering one costs more than a small tensor's pass).
template <class F>
double lane_sum(int64_t n, F f) {
  if (n <= kSumChunk) return n > 0 ? lane_sum_range(0, n, f) : 0.0;
  const int64_t chunks = (n + kSumChunk - 1) / kSumChunk;
  std::vector<double> part(static_cast<size_t>(chunks));
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < chunks; ++c)
    part[c] = lane_sum_range(c * kSumChunk, std::min(n, (c + 1) * kSumChunk), f);
  double s = 0.0;
  for (double v : part) s += v;
  return s;
}

// Adds the number of non-finite entries of x to *nonfinite and Σ x² over the finite ones to
// *sumsq, in lane_sum's partition, in one read of x (the count is exact: whole numbers in
// double).
inline void finite_sumsq_range(const float* x, int64_t i0, int64_t i1, double* nonfinite, double* sumsq) {
  double sq[kSumLanes] = {};
  int32_t bad[kSumLanes] = {};  // at most kSumChunk / kSumLanes per lane
  // nf: all ones where x[i] is not finite (its exponent bits all set), else 0. Integer
  // operations, so the loop vectorizes (GCC 12 left a float select's form scalar).
  auto term = [x](int64_t i, uint32_t& nf) {
    uint32_t b;
    std::memcpy(&b, &x[i], sizeof b);
    nf = (b & 0x7f800000u) == 0x7f800000u ? 0xffffffffu : 0u;
    b &= ~nf;  // a non-finite entry counts as 0.0f
    float w;
    std::memcpy(&w, &b, sizeof w);
    return static_cast<double>(w) * w;
  };
  int64_t i = i0;
  for (; i + kSumLanes <= i1; i += kSumLanes) {
#pragma omp simd
    for (int j = 0; j < kSumLanes; ++j) {
      uint32_t nf;
      sq[j] += term(i + j, nf);
      bad[j] += static_cast<int32_t>(nf & 1u);
    }
  }
  double s = 0.0, b = 0.0;
  for (int j = 0; j < kSumLanes; ++j) {
    s += sq[j];
    b += bad[j];
  }
  for (; i < i1; ++i) {
    uint32_t nf;
    s += term(i, nf);
    b += static_cast<double>(nf & 1u);
  }
  *nonfinite += b;
  *sumsq += s;
}

inline void finite_sumsq(const float* x, int64_t n, double* nonfinite, double* sumsq) {
  if (n <= kSumChunk) {
    if (n > 0) finite_sumsq_range(x, 0, n, nonfinite, sumsq);
    return;
  }
  const int64_t chunks = (n + kSumChunk - 1) / kSumChunk;
  std::vector<double> part(static_cast<size_t>(2 * chunks), 0.0);
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < chunks; ++c)
    finite_sumsq_range(x, c * kSumChunk, std::min(n, (c + 1) * kSumChunk), &part[2 * c], &part[2 * c + 1]);
  for (int64_t c = 0; c < chunks; ++c) {
    *nonfinite += part[2 * c];
    *sumsq += part[2 * c + 1];
  }
}

}  // namespace celo2
