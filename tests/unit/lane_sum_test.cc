// The step's element-wise passes that also sum (celo2/lane_sum.h): the recipe's apply
// (apply_update), the AdamW branch (adamw_update_sumsq through adamw_apply) and the gradient
// statistics (finite_sumsq), each against the plain one-element-at-a-time loop beside it:
// the same element bits, sums within 1e-12 relative (double sums of the same terms in another
// order), exact counts of non-finite entries, and the same bits at 1 and 2 threads.
#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "celo2/adamw.h"
#include "celo2/lane_sum.h"
#include "celo2/recipe.h"

namespace celo2 {
namespace {

std::vector<float> randn(int64_t n, unsigned seed, float scale) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> d(0.0f, scale);
  std::vector<float> x(static_cast<size_t>(n));
  for (float& v : x) v = d(rng);
  return x;
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

// Sizes: below a lane block, a tail after whole blocks, one chunk exactly, several chunks
// and a ragged last one.
const int64_t kSizes[] = {0, 7, 16 * 5 + 3, kSumChunk, 3 * kSumChunk + 1001};

TEST(LaneSum, ApplyUpdateMatchesThePlainLoop) {
  for (int64_t n : kSizes) {
    const std::vector<float> p0 = randn(n, 1, 0.02f), u = randn(n, 2, 1.0f);
    std::vector<float> plain = p0;
    double want = 0.0;
    for (int64_t i = 0; i < n; ++i) {
      const float d = 1e-3f * (u[i] + 0.1f * plain[i]);
      plain[i] -= d;
      want += static_cast<double>(d) * d;
    }
    std::vector<double> got;
    for (int threads : {1, 2}) {
      omp_set_num_threads(threads);
      std::vector<float> p = p0;
      got.push_back(apply_update(1e-3f, 0.1f, n, p.data(), u.data()));
      EXPECT_TRUE(same_bits(p, plain)) << "n " << n << ", " << threads << " threads";
      EXPECT_NEAR(got.back(), want, 1e-12 * want) << "n " << n;
    }
    EXPECT_EQ(std::memcmp(&got[0], &got[1], sizeof(double)), 0) << "thread count changed the sum, n " << n;
  }
}

TEST(LaneSum, AdamWSumsTheParametersChange) {
  for (int64_t n : kSizes) {
    const std::vector<float> p0 = randn(n, 3, 0.02f), g = randn(n, 4, 1e-3f), mu0 = randn(n, 5, 1e-4f);
    std::vector<float> nu0 = randn(n, 6, 1e-6f);
    for (float& v : nu0) v = v * v;
    AdamWParams a;
    a.lr = 3e-4f;
    a.wd = 0.1f;
    a.count = 7;
    std::vector<float> p = p0, mu = mu0, nu = nu0;
    adamw_update(a, n, p.data(), g.data(), mu.data(), nu.data());
    double want = 0.0;
    for (int64_t i = 0; i < n; ++i) {
      const double d = static_cast<double>(p0[i]) - p[i];
      want += d * d;
    }
    std::vector<double> got;
    for (int threads : {1, 2}) {
      omp_set_num_threads(threads);
      std::vector<float> q = p0, m = mu0, v = nu0, scratch;
      got.push_back(adamw_apply(a, n, q.data(), g.data(), m.data(), v.data(), /*reference=*/false, scratch));
      EXPECT_TRUE(same_bits(q, p) && same_bits(m, mu) && same_bits(v, nu)) << "n " << n;
      EXPECT_NEAR(got.back(), want, 1e-12 * want) << "n " << n;
    }
    EXPECT_EQ(std::memcmp(&got[0], &got[1], sizeof(double)), 0) << "n " << n;
    // The reference branch keeps its own arithmetic; its sum is of its own change.
    std::vector<float> q = p0, m = mu0, v = nu0, scratch;
    const double ref = adamw_apply(a, n, q.data(), g.data(), m.data(), v.data(), /*reference=*/true, scratch);
    EXPECT_NEAR(ref, want, 1e-3 * want + 1e-30) << "n " << n;
  }
}

TEST(LaneSum, FiniteSumsqCountsAndSums) {
  const float inf = std::numeric_limits<float>::infinity(), nan = std::numeric_limits<float>::quiet_NaN();
  for (int64_t n : kSizes) {
    std::vector<float> x = randn(n, 7, 2.0f);
    int64_t planted = 0;
    for (int64_t i = 3; i < n; i += 9973) {
      x[i] = (planted % 3 == 0) ? nan : (planted % 3 == 1 ? inf : -inf);
      ++planted;
    }
    if (n > 0) {
      x[n - 1] = nan;  // in the tail after the last whole lane block
      ++planted;
    }
    double want = 0.0;
    int64_t bad = 0;
    for (float v : x) {
      if (std::isfinite(v)) want += static_cast<double>(v) * v;
      else ++bad;
    }
    EXPECT_EQ(bad, planted);
    std::vector<double> sums;
    for (int threads : {1, 2}) {
      omp_set_num_threads(threads);
      double nf = 5.0, sq = 1.0;  // adds to what is there
      finite_sumsq(x.data(), n, &nf, &sq);
      EXPECT_EQ(nf, 5.0 + static_cast<double>(bad)) << "n " << n;
      EXPECT_NEAR(sq, 1.0 + want, 1e-12 * (1.0 + want)) << "n " << n;
      sums.push_back(sq);
    }
    EXPECT_EQ(std::memcmp(&sums[0], &sums[1], sizeof(double)), 0) << "n " << n;
  }
}

}  // namespace
}  // namespace celo2
