// celo2/lowp.h: the bf16/fp16 conversions against the compiler's own (_Float16) and the
// definition of bfloat16 (the top 16 bits of a float32, rounded to nearest even), and the
// master loops the engine runs.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>

#include "celo2/lowp.h"

namespace celo2 {
namespace {

uint32_t bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
float from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// bf16 by its definition: the nearest value with 8 significand bits, ties to even, in double.
uint16_t bf16_by_definition(float f) {
  if (std::isnan(f)) return 0x7fc0;
  if (std::isinf(f)) return bits(f) >> 16;
  const uint32_t lo = bits(f) & 0xffff0000u;  // truncated toward zero
  const uint32_t hi = lo + 0x10000u;          // next away from zero (may be Inf: fine)
  const double dl = std::fabs(static_cast<double>(f) - from_bits(lo));
  // Past the largest finite value the next one is Inf, which IEEE rounding treats as 2^128.
  const double next = (hi & 0x7fffffffu) == 0x7f800000u ? std::copysign(std::ldexp(1.0, 128), f)
                                                        : static_cast<double>(from_bits(hi));
  const double dh = std::fabs(next - f);
  if (dl < dh || (dl == dh && ((lo >> 16) & 1u) == 0)) return lo >> 16;
  return hi >> 16;
}

TEST(LowP, HalfMatchesTheCompilersFloat16) {
#if defined(__FLT16_MAX__)
  // Every half value round-trips; floats (all exponents, ties, subnormals, overflow) round
  // as the compiler's _Float16 conversion does.
  for (uint32_t h = 0; h < 65536; ++h) {
    _Float16 x;
    const uint16_t hh = static_cast<uint16_t>(h);
    std::memcpy(&x, &hh, 2);
    const float want = static_cast<float>(x);
    const float got = lowp::from_f16(hh);
    if (std::isnan(want)) {
      ASSERT_TRUE(std::isnan(got)) << h;
      continue;
    }
    ASSERT_EQ(bits(got), bits(want)) << "half " << h;
    ASSERT_EQ(lowp::to_f16(got), hh) << "half " << h;
  }
  std::mt19937 rng(7);
  std::uniform_int_distribution<uint32_t> any;
  for (int k = 0; k < 2000000; ++k) {
    uint32_t u = any(rng);
    // Half the draws near half's range (exponents 100..145), where the cases are.
    if (k % 2) u = (u & 0x807fffffu) | ((100u + (u >> 23) % 46u) << 23);
    if (k % 7 == 0) u &= 0xffffe000u | (1u << 12);  // exact ties below the kept bits
    const float f = from_bits(u);
    const _Float16 want = static_cast<_Float16>(f);
    uint16_t wb;
    std::memcpy(&wb, &want, 2);
    const uint16_t got = lowp::to_f16(f);
    if (std::isnan(f)) {
      ASSERT_EQ(got & 0x7c00u, 0x7c00u);
      ASSERT_NE(got & 0x3ffu, 0u);
      continue;
    }
    ASSERT_EQ(got, wb) << "float bits " << std::hex << u;
  }
#else
  GTEST_SKIP() << "this compiler has no _Float16 to compare with";
#endif
}

TEST(LowP, BFloat16IsTheNearestEven) {
  std::mt19937 rng(3);
  std::uniform_int_distribution<uint32_t> any;
  for (int k = 0; k < 2000000; ++k) {
    uint32_t u = any(rng);
    if (k % 5 == 0) u = (u & 0xffff0000u) | 0x8000u;  // exact ties
    const float f = from_bits(u);
    const uint16_t got = lowp::to_bf16(f);
    if (std::isnan(f)) {
      ASSERT_TRUE(std::isnan(lowp::from_bf16(got)));
      continue;
    }
    ASSERT_EQ(got, bf16_by_definition(f)) << std::hex << u;
    ASSERT_EQ(bits(lowp::from_bf16(got)), static_cast<uint32_t>(got) << 16);
  }
}

TEST(LowP, MasterLoops) {
  for (DType d : {DType::kBFloat16, DType::kFloat16}) {
    const bool bf = d == DType::kBFloat16;
    std::vector<float> master = {0.1f, -2.5f, 1e-3f, 3.14159f, 0.0f};
    std::vector<uint16_t> half(master.size());
    store_lowp(d, half.data(), master.data(), static_cast<int64_t>(master.size()));
    for (size_t i = 0; i < master.size(); ++i) EXPECT_EQ(half[i], lowp::to_half(bf, master[i]));
    // Untouched parameters keep the masters' extra precision.
    const std::vector<float> before = master;
    EXPECT_EQ(reseed_master(d, master.data(), half.data(), 5), 0);
    EXPECT_EQ(master, before);
    // Two written by the trainer are taken from the parameters.
    half[1] = lowp::to_half(bf, 7.0f);
    half[3] = lowp::to_half(bf, -0.5f);
    EXPECT_EQ(reseed_master(d, master.data(), half.data(), 5), 2);
    EXPECT_EQ(master[1], 7.0f);
    EXPECT_EQ(master[3], -0.5f);
    EXPECT_EQ(master[0], before[0]);
  }
  EXPECT_EQ(parse_dtype("bfloat16"), DType::kBFloat16);
  EXPECT_THROW(parse_dtype("int8"), std::invalid_argument);
  float m = 1.0f;
  uint16_t h = 0;
  EXPECT_THROW(reseed_master(DType::kFloat32, &m, &h, 1), std::invalid_argument);
}

// The vectorized, threaded loops (one copy per format, branch-free reseed) against the
// element-by-element conversions on a large slice with every kind of value: normal, subnormal
// in the half format, overflowing, infinite, NaN, signed zeros; a share of the parameters
// written by the trainer. Equal bits.
TEST(LowP, MasterLoopsOnALargeSliceMatchElementByElement) {
  const int64_t n = 200003;  // above the threading threshold, not a multiple of any vector
  std::mt19937 rng(7);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<float> master(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    const float v = nd(rng) * std::ldexp(1.0f, static_cast<int>(i % 60) - 40);  // 2^-40 .. 2^19
    master[i] = v;
  }
  master[5] = std::numeric_limits<float>::quiet_NaN();
  master[6] = std::numeric_limits<float>::infinity();
  master[7] = -std::numeric_limits<float>::infinity();
  master[8] = -0.0f;
  master[9] = 70000.0f;  // above float16's range
  for (DType d : {DType::kBFloat16, DType::kFloat16}) {
    const bool bf = d == DType::kBFloat16;
    std::vector<uint16_t> half(static_cast<size_t>(n));
    store_lowp(d, half.data(), master.data(), n);
    int64_t wrong = 0;
    for (int64_t i = 0; i < n; ++i) wrong += half[i] != lowp::to_half(bf, master[i]);
    EXPECT_EQ(wrong, 0) << dtype_name(d) << ": store_lowp";
    // The trainer writes every 97th parameter.
    std::vector<uint16_t> written = half;
    for (int64_t i = 0; i < n; i += 97) written[i] = lowp::to_half(bf, 0.25f + static_cast<float>(i % 13));
    std::vector<float> want = master;
    int64_t want_changed = 0;
    for (int64_t i = 0; i < n; ++i)
      if (lowp::to_half(bf, want[i]) != written[i]) {
        want[i] = lowp::from_half(bf, written[i]);
        ++want_changed;
      }
    std::vector<float> got = master;
    EXPECT_EQ(reseed_master(d, got.data(), written.data(), n), want_changed) << dtype_name(d);
    EXPECT_EQ(std::memcmp(got.data(), want.data(), got.size() * sizeof(float)), 0) << dtype_name(d);
  }
}

}  // namespace
}  // namespace celo2
