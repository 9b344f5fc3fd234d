// Every golden file of spec §8 through the fast path and through the reference, at the
// spec's tolerance: max |error| / RMS(expected) <= 1e-4 per tensor and step.
#include <gtest/gtest.h>

#include <filesystem>

#include "golden.h"

namespace {

constexpr double kTol = 1e-4;

std::vector<std::string> golden_files() {
  std::vector<std::string> out;
  for (const auto& e : std::filesystem::directory_iterator(CELO2_GOLDEN_DIR))
    if (e.path().extension() == ".msgpack") out.push_back(e.path().string());
  std::sort(out.begin(), out.end());
  return out;
}

class Golden : public ::testing::TestWithParam<std::tuple<std::string, celo2::GoldenEngine>> {};

TEST_P(Golden, WithinTolerance) {
  const auto& [path, engine] = GetParam();
  const celo2::GoldenResult r = celo2::run_golden_file(path, engine);
  ASSERT_FALSE(r.checks.empty());
  for (const auto& c : r.checks)
    EXPECT_LE(c.rel_err, kTol) << path << " step " << c.step << " tensor " << c.tensor;
  std::printf("%s: worst %.3e over %zu checks\n", path.c_str(), r.worst, r.checks.size());
}

INSTANTIATE_TEST_SUITE_P(
    All, Golden,
    ::testing::Combine(::testing::ValuesIn(golden_files()),
                       ::testing::Values(celo2::GoldenEngine::kFast,
                                         celo2::GoldenEngine::kReference)),
    [](const auto& info) {
      std::string n = std::filesystem::path(std::get<0>(info.param)).stem().string();
      n += std::get<1>(info.param) == celo2::GoldenEngine::kFast ? "_fast" : "_reference";
      return n;
    });

TEST(GoldenFiles, AllPresent) { EXPECT_EQ(golden_files().size(), 13u); }

}  // namespace
