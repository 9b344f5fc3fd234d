// Newton–Schulz split over groups of ranks (celo2/split_ns.h) under mpirun -np 2..6: equal to
// the unsplit newton_schulz to max|err|/RMS <= 1e-5, for groups larger than a matrix's column
// count (ranks with empty blocks), tall matrices (transposed by the caller), two groups at
// once (split by colour), and the cost model byte-exact against the communicator's counters.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>

#include "celo2/newton_schulz.h"
#include "celo2/split_ns.h"
#include "mpi_test_main.h"

namespace celo2 {
namespace {

std::shared_ptr<Communicator> g_comm;

std::vector<float> matrix(int64_t rows, int64_t cols, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> nd;
  std::vector<float> x(static_cast<size_t>(rows * cols));
  for (float& v : x) v = nd(rng);
  return x;
}

// Runs the split iteration of the wide r×c matrix `wide` over `group` (column blocks
// [c·i/g, c·(i+1)/g)) and returns this rank's max|err| against `want` (the whole result),
// divided by RMS(want).
double split_error(const RuleConfig& cfg, int64_t r, int64_t c, const std::vector<float>& wide,
                   const std::vector<float>& want, Communicator& group) {
  const int g = group.size(), i = group.rank();
  const int64_t c0 = c * i / g, c1 = c * (i + 1) / g, cl = c1 - c0;
  std::vector<float> block(static_cast<size_t>(r * cl)), scratch;
  for (int64_t row = 0; row < r; ++row)
    for (int64_t k = 0; k < cl; ++k) block[row * cl + k] = wide[row * c + c0 + k];
  newton_schulz_split(cfg, r, cl, block.data(), group, scratch);
  double rms = 0, err = 0;
  for (float v : want) rms += static_cast<double>(v) * v;
  rms = std::sqrt(rms / static_cast<double>(want.size()));
  for (int64_t row = 0; row < r; ++row)
    for (int64_t k = 0; k < cl; ++k)
      err = std::max(err, std::fabs(static_cast<double>(block[row * cl + k]) - want[row * c + c0 + k]));
  return err / rms;
}

// The largest of every rank's value (any rank's error fails every rank).
double worst_over_ranks(double x) {
  std::vector<double> all(g_comm->size(), 0.0);
  all[g_comm->rank()] = x;
  g_comm->all_reduce_sum(all.data(), static_cast<int64_t>(all.size()));
  return *std::max_element(all.begin(), all.end());
}

std::vector<float> transpose(const std::vector<float>& x, int64_t rows, int64_t cols) {
  std::vector<float> t(x.size());
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) t[j * rows + i] = x[i * cols + j];
  return t;
}

TEST(SplitNewtonSchulz, EqualsTheUnsplitIteration) {
  const RuleConfig cfg;
  // (rows, cols) as the tensor has them; tall ones are transposed to the wide orientation.
  const std::vector<std::pair<int64_t, int64_t>> shapes = {{8, 24}, {24, 8}, {16, 5}, {1, 7}, {32, 96}, {3, 2}, {40, 40}};
  for (auto [rows, cols] : shapes) {
    SCOPED_TRACE(std::to_string(rows) + "x" + std::to_string(cols) + " on " + std::to_string(g_comm->size()));
    const std::vector<float> x = matrix(rows, cols, rows * 131 + cols);
    std::vector<float> want = x, scratch;
    newton_schulz(cfg, rows, cols, want.data(), scratch, NsMethod::kStandard);
    const bool tall = rows > cols;
    const int64_t r = tall ? cols : rows, c = tall ? rows : cols;
    const std::vector<float> wide = tall ? transpose(x, rows, cols) : x;
    const std::vector<float> want_wide = tall ? transpose(want, rows, cols) : want;
    const double worst = worst_over_ranks(split_error(cfg, r, c, wide, want_wide, *g_comm));
    if (g_comm->rank() == 0)
      std::printf("[W=%d] %lldx%lld split over %d ranks: max|err|/RMS %.2e\n", g_comm->size(),
                  static_cast<long long>(rows), static_cast<long long>(cols), g_comm->size(), worst);
    EXPECT_LE(worst, 1e-5);
  }
}

TEST(SplitNewtonSchulz, TwoGroupsAtOnceAndTheCostModel) {
  // Ranks split by colour (even / odd): each group orthogonalizes its own matrix at the same
  // time; the group's counters equal split_ns_cost to the byte.
  const RuleConfig cfg;
  const int color = g_comm->rank() % 2;
  std::unique_ptr<Communicator> group = g_comm->split(color, g_comm->rank());
  ASSERT_EQ(group->size(), (g_comm->size() + 1 - color) / 2);
  const int64_t r = color ? 12 : 20, c = color ? 50 : 33;
  const std::vector<float> x = matrix(r, c, 7 + color);
  std::vector<float> want = x, scratch;
  newton_schulz(cfg, r, c, want.data(), scratch, NsMethod::kStandard);
  group->reset_counters();
  double err = split_error(cfg, r, c, x, want, *group);
  const SplitNsCost model = split_ns_cost(cfg, r, group->size());
  int64_t bytes = 0, calls = 0;
  for (const auto& [op, k] : group->counters()) {
    bytes += k.bytes;
    calls += k.calls;
  }
  EXPECT_EQ(bytes, static_cast<int64_t>(model.bytes_per_rank));
  EXPECT_EQ(calls, model.all_reduces);
  EXPECT_LE(worst_over_ranks(err), 1e-5);
}

}  // namespace
}  // namespace celo2

int main(int argc, char** argv) { return celo2::testing::run_mpi_tests(argc, argv, celo2::g_comm); }
