// Helpers shared by the rule tests: seeded normal data and the spec §8 error measure.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

namespace celo2::test_util {

// max |got − want| / RMS(want) over n values (NaN in got propagates; 0 for n = 0).
inline double rel_err(const float* got, const float* want, size_t n) {
  double m = 0, s = 0;
  for (size_t i = 0; i < n; ++i) {
    const double e = std::fabs(static_cast<double>(got[i]) - want[i]);
    if (!(e <= m)) m = e;  // NaN propagates
    s += static_cast<double>(want[i]) * want[i];
  }
  if (n == 0) return 0;
  return m / std::max(std::sqrt(s / static_cast<double>(n)), 1e-30);
}
inline double rel_err(const std::vector<float>& got, const std::vector<float>& want) {
  EXPECT_EQ(got.size(), want.size());
  if (got.size() != want.size()) return std::numeric_limits<double>::infinity();
  return rel_err(got.data(), want.data(), want.size());
}

inline std::vector<float> randn(size_t n, uint64_t seed, float scale = 1.0f) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> nd(0.0f, scale);
  std::vector<float> v(n);
  for (float& x : v) x = nd(rng);
  return v;
}

}  // namespace celo2::test_util
